//! The safe cutover against real servers: `ficus cutover` moves a service's share step by step
//! (plan, preflight, fence, drain to a marker, verify, record start, flip, observe) under a
//! running `ficus run` while an application keeps writing on whichever side owns each key and
//! holds writes for fenced keys; a `kill -9` at any step resumes; `--abort` returns to the last
//! stable share; the verify gate stops a move over a tampered document.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bson::{Document, doc};
use common::{Ficus, World, eventually};
use ficus::cutover::route;
use ficus::testkit::workload::Workload;
use serde_json::json;

const SERVICE: &str = "customers_db";
const CUSTOMERS: u64 = 40;

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn ok(out: &std::process::Output) -> String {
    let t = text(out);
    assert!(out.status.success(), "exit {:?}:\n{t}", out.status.code());
    t
}

/// A world with customers in the monolith and `ficus run` for customers_db caught up, serving
/// `/cutover` on the returned port.
async fn setup() -> (World, mongodb::Client, Ficus, u16) {
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    let monolith = client.database("linechatbot").collection::<Document>("customers");
    let mut w = Workload::new(5);
    for i in 0..CUSTOMERS {
        monolith.insert_one(w.customer(i)).await.unwrap();
    }
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let f = world.spawn_ficus(&["run", "--service", SERVICE, "--metrics-addr", &addr], &[]);
    let service = client.database(SERVICE).collection::<Document>("customers");
    eventually("customers_db populated", Duration::from_secs(120), || async {
        service.count_documents(doc! {}).await.unwrap() == CUSTOMERS
    })
    .await;
    (world, client, f, port)
}

/// customers_db's cutover state as `ficus status --json` prints it.
fn status_json(world: &World) -> serde_json::Value {
    let out = world.ficus(&["status", "--json"], &[]);
    let text = ok(&out);
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}:\n{text}"));
    all["cutover"].as_array().and_then(|a| a.iter().find(|c| c["service"] == SERVICE)).cloned().unwrap_or_default()
}

/// customers_db's cutover state as `GET /cutover` serves it (re-read every 5 s).
fn served(port: u16) -> serde_json::Value {
    let (code, body) = common::http_get(port, "/cutover");
    assert_eq!(code, 200, "{body}");
    let all: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}:\n{body}"));
    all["services"].as_array().and_then(|a| a.iter().find(|c| c["service"] == SERVICE)).cloned().unwrap_or_default()
}

/// The ownership record as an application reads it: (share, fenced buckets, epoch).
async fn ownership(client: &mongodb::Client) -> (u8, Option<(u8, u8)>, i64) {
    let Some(o) =
        client.database("ficus").collection::<Document>("ownership").find_one(doc! { "_id": SERVICE }).await.unwrap()
    else {
        return (0, None, 0);
    };
    let percent = o.get_i32("percent").unwrap() as u8;
    let fenced =
        o.get_document("fenced").ok().map(|f| (f.get_i32("from").unwrap() as u8, f.get_i32("to").unwrap() as u8));
    (percent, fenced, o.get_i64("epoch").unwrap())
}

fn cutover(world: &World, args: &[&str]) -> std::process::Output {
    let mut all = vec!["cutover", "--service", SERVICE, "--timeout", "120"];
    all.extend_from_slice(args);
    world.ficus(&all, &[])
}

/// An application: writes each customer's name on the side that owns its key, holds writes for
/// fenced keys, and remembers the last value it wrote per key.
struct App {
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    written: Arc<Mutex<HashMap<String, String>>>,
    held: Arc<Mutex<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    fn start(client: &mongodb::Client) -> App {
        let (stop, pause) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let written = Arc::new(Mutex::new(HashMap::new()));
        let held = Arc::new(Mutex::new(0));
        let task = {
            let (client, stop, pause, written, held) =
                (client.clone(), stop.clone(), pause.clone(), written.clone(), held.clone());
            tokio::spawn(async move {
                let monolith = client.database("linechatbot").collection::<Document>("customers");
                let service = client.database(SERVICE).collection::<Document>("customers");
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    if pause.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    n += 1;
                    let key = Workload::user_id(n % CUSTOMERS);
                    let bucket = route::bucket(&key);
                    let (percent, fenced, _) = ownership(&client).await;
                    if fenced.is_some_and(|(from, to)| (from..to).contains(&bucket)) {
                        *held.lock().unwrap() += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    let value = format!("v{n}");
                    if route::owns(percent, bucket) {
                        service
                            .update_one(doc! { "_id": &key }, doc! { "$set": { "displayName": &value } })
                            .await
                            .unwrap();
                    } else {
                        monolith
                            .update_one(doc! { "user_id": &key }, doc! { "$set": { "name": &value } })
                            .await
                            .unwrap();
                    }
                    written.lock().unwrap().insert(key, value);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        App { stop, pause, written, held, task }
    }

    async fn finish(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
    }
}

/// Every value the application wrote last is on both sides.
async fn both_sides_hold(client: &mongodb::Client, written: &HashMap<String, String>) -> Vec<String> {
    let monolith = client.database("linechatbot").collection::<Document>("customers");
    let service = client.database(SERVICE).collection::<Document>("customers");
    let mut missing = Vec::new();
    for (key, value) in written {
        let m = monolith.find_one(doc! { "user_id": key }).await.unwrap();
        let s = service.find_one(doc! { "_id": key }).await.unwrap();
        let mv = m.as_ref().and_then(|d| d.get_str("name").ok());
        let sv = s.as_ref().and_then(|d| d.get_str("displayName").ok());
        if mv != Some(value.as_str()) || sv != Some(value.as_str()) {
            missing
                .push(format!("{key} (bucket {}): wrote {value}, monolith {mv:?}, service {sv:?}", route::bucket(key)));
        }
    }
    missing
}

async fn converged(client: &mongodb::Client, written: &HashMap<String, String>, step: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let missing = both_sides_hold(client, written).await;
        if missing.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "after {step}, writes missing on a side:\n{}", missing.join("\n"));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_whole_cycle_0_10_50_100_0_loses_no_write_on_either_side() {
    let (world, client, mut f, _) = setup().await;
    let app = App::start(&client);
    let mut epoch = 0;
    for to in [10u8, 50, 100, 0] {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let out = ok(&cutover(&world, &["--to", &to.to_string()]));
        for step in ["plan", "preflight", "fence", "drain", "verify", "record-start", "flip", "observe"] {
            assert!(out.contains(&format!("] {step} done")), "step {step} not reported:\n{out}");
        }
        let (percent, fenced, now) = ownership(&client).await;
        assert_eq!((percent, fenced), (to, None), "after --to {to}:\n{out}");
        assert_eq!(now, epoch + 2, "a move is a fence (epoch + 1) and a flip (epoch + 2)");
        epoch = now;
        // Quiesce, then both sides hold every write and verify passes.
        app.pause.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let written = app.written.lock().unwrap().clone();
        converged(&client, &written, &format!("--to {to}")).await;
        let v = world.ficus(&["verify", "--checks", "counts,contents", "--service", SERVICE, "--settle", "2"], &[]);
        assert!(v.status.success(), "verify after --to {to}:\n{}", text(&v));
        app.pause.store(false, Ordering::SeqCst);
    }
    let held = *app.held.lock().unwrap();
    let written = app.written.lock().unwrap().len();
    app.finish().await;
    assert!(written as u64 == CUSTOMERS, "the application wrote every customer ({written})");
    eprintln!("cycle: {held} writes held while fenced");
    assert!(f.terminate().success(), "{}", f.logs());
}

/// Runs `ficus cutover --to TO --until STEP` in the background and SIGKILLs it once `step` has
/// begun: mid-step, or (a step of milliseconds) just after it, where `--until` stops it anyway.
async fn kill_in(world: &World, to: u8, step: &str, name: &str) -> String {
    let mut c = world.spawn_ficus_named(
        name,
        &["cutover", "--service", SERVICE, "--to", &to.to_string(), "--timeout", "120", "--until", step],
        &[],
    );
    let began = format!("] {step}: ");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let logs = c.logs();
        if logs.contains(&began) {
            c.sigkill();
            return logs;
        }
        if let Some(st) = c.wait(Duration::from_millis(10)) {
            let logs = c.logs();
            assert!(st.success(), "the cutover failed ({st}) before {step}:\n{logs}");
            return logs;
        }
        assert!(Instant::now() < deadline, "no `{step}` within 180 s:\n{logs}");
    }
}

/// Runs `ficus cutover --to TO --until STEP` to its stop.
fn until(world: &World, to: u8, step: &str) -> String {
    let out = ok(&cutover(world, &["--to", &to.to_string(), "--until", step]));
    assert!(out.contains(&format!("stopped after {step}")), "{out}");
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cutover_killed_at_every_step_resumes_and_abort_returns_to_the_stable_share() {
    let (world, client, mut f, port) = setup().await;
    // 0 → 50, SIGKILLed in each step in turn: each run resumes where the last one stopped.
    let steps = ["plan", "preflight", "fence", "drain", "verify", "record-start", "flip"];
    for (i, step) in steps.iter().enumerate() {
        let logs = kill_in(&world, 50, step, &format!("kill-{i}")).await;
        // It resumes, or starts afresh when the run before was killed before it saved a step.
        let started = logs.contains("resuming the move from 0% to 50%") || logs.contains("moving from 0% to 50%");
        assert!(started, "run {i} ({step}): {logs}");
    }
    let out = ok(&cutover(&world, &["--to", "50"]));
    assert!(out.contains("resuming") && out.contains("] observe done"), "{out}");
    assert_eq!(ownership(&client).await, (50, None, 2), "the same end as an uninterrupted move");

    // A different target while a move is under way is refused (bad input), and so is nonsense.
    until(&world, 100, "fence");
    let out = cutover(&world, &["--to", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("under way"), "{}", text(&out));
    assert_eq!(cutover(&world, &["--to", "101"]).status.code(), Some(2));
    let out = world.ficus(&["cutover", "--service", "no_such_db", "--to", "10"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    // What applications read mid-move: the next step, the fenced buckets, not yet flippable.
    let (_, fenced, _) = ownership(&client).await;
    assert_eq!(fenced, Some((50, 100)), "fenced mid-move");
    let state = status_json(&world);
    assert_eq!(
        (&state["phase"], &state["fenced"]["from"], &state["fenced"]["to"], &state["canFlip"], &state["percent"]),
        (&json!("drain"), &json!(50), &json!(100), &json!(false), &json!(50)),
        "{state}"
    );
    let key = |c: &serde_json::Value| {
        ["percent", "epoch", "phase", "moving", "fenced", "canFlip", "canRollback"].map(|k| c[k].clone())
    };
    eventually("GET /cutover shows what status does", Duration::from_secs(30), || async {
        key(&served(port)) == key(&state)
    })
    .await;

    // --abort before the flip: unfenced, back at 50%.
    ok(&cutover(&world, &["--abort"]));
    let (percent, fenced, _) = ownership(&client).await;
    assert_eq!((percent, fenced), (50, None));
    assert_eq!(cutover(&world, &["--abort"]).status.code(), Some(2), "nothing left to abort");

    // --abort after the flip: the same machine back the other way.
    until(&world, 100, "flip");
    assert_eq!(ownership(&client).await.0, 100);
    let out = ok(&cutover(&world, &["--abort"]));
    assert!(out.contains("moves back from 100% to 50%") && out.contains("] observe done"), "{out}");
    assert_eq!(ownership(&client).await.0, 50);

    // --dry-run changes nothing.
    let before = ownership(&client).await;
    let out = ok(&cutover(&world, &["--to", "100", "--dry-run"]));
    assert!(out.contains("plan: buckets 50..100") && out.contains("nothing changed"), "{out}");
    assert_eq!(ownership(&client).await, before);
    assert!(f.terminate().success(), "{}", f.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_on_the_losing_side_just_before_the_flip_is_on_both_sides_after_it() {
    let (world, client, mut f, _) = setup().await;
    until(&world, 100, "record-start");
    let state = status_json(&world);
    assert_eq!((&state["phase"], &state["canFlip"]), (&json!("flip"), &json!(true)), "{state}");
    // The monolith is losing every bucket; an application ignoring the fence writes anyway.
    let key = Workload::user_id(7);
    let monolith = client.database("linechatbot").collection::<Document>("customers");
    monolith.update_one(doc! { "user_id": &key }, doc! { "$set": { "name": "just before the flip" } }).await.unwrap();
    let out = ok(&cutover(&world, &["--to", "100"]));
    assert!(out.contains("] flip done"), "{out}");
    let written = HashMap::from([(key, "just before the flip".to_string())]);
    converged(&client, &written, "the flip").await;
    assert!(f.terminate().success(), "{}", f.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_document_in_a_moving_bucket_stops_the_cutover_at_verify() {
    let (world, client, mut f, _) = setup().await;
    // A customer in the buckets 0..50 would move; change it behind ficus's back.
    let key = (0..CUSTOMERS).map(Workload::user_id).find(|k| route::bucket(k) < 50).unwrap();
    let service = client.database(SERVICE).collection::<Document>("customers");
    service.update_one(doc! { "_id": &key }, doc! { "$set": { "displayName": "tampered" } }).await.unwrap();
    let out = cutover(&world, &["--to", "50"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("verify gate failed") && t.contains(&key), "the gate and the document named:\n{t}");
    let (percent, fenced, _) = ownership(&client).await;
    assert_eq!(percent, 0, "nothing flipped");
    assert_eq!(fenced, Some((0, 50)), "the buckets stay fenced until fixed or aborted");
    ok(&cutover(&world, &["--abort"]));
    assert_eq!(ownership(&client).await.1, None);
    assert!(f.terminate().success(), "{}", f.logs());
}

/// conversations_db routes a conversation by its user (`route = "user_id"`), and ai_sessions_db
/// reads the same monolith collection. Through 0 → 10 → 50 → 100 → 0, after each move a
/// conversation of an owned user is renamed on the service side and one of a user the monolith
/// keeps on the monolith side: both land on both sides, and both services verify.
#[tokio::test(flavor = "multi_thread")]
async fn conversations_move_with_their_user_and_every_reader_of_them_stays_consistent() {
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    let monolith = client.database("linechatbot").collection::<Document>("conversations");
    let service = client.database("conversations_db").collection::<Document>("conversations");
    let mut w = Workload::new(9);
    let convs: Vec<Document> = (0..30).map(|i| w.conversation(i, 2)).collect();
    monolith.insert_many(convs.clone()).await.unwrap();
    let mut f = world.spawn_ficus(&["run", "--service", "conversations_db", "--service", "ai_sessions_db"], &[]);
    eventually("conversations_db populated", Duration::from_secs(120), || async {
        service.count_documents(doc! {}).await.unwrap() == 30
    })
    .await;
    let conv = |owned: bool, percent: u8| {
        convs.iter().find(|c| route::owns(percent, route::bucket(c.get_str("user_id").unwrap())) == owned).cloned()
    };
    for (n, to) in [10u8, 50, 100, 0].into_iter().enumerate() {
        let out = world
            .ficus(&["cutover", "--service", "conversations_db", "--to", &to.to_string(), "--timeout", "120"], &[]);
        assert!(out.status.success(), "--to {to}:\n{}", text(&out));
        let name = format!("renamed at step {n}");
        let mut expect = Vec::new();
        if let Some(c) = conv(true, to) {
            service
                .update_one(doc! { "_id": c.get("_id").unwrap() }, doc! { "$set": { "displayName": &name } })
                .await
                .unwrap();
            expect.push(c.get("_id").unwrap().clone());
        }
        if let Some(c) = conv(false, to) {
            monolith
                .update_one(doc! { "_id": c.get("_id").unwrap() }, doc! { "$set": { "user_name": &name } })
                .await
                .unwrap();
            expect.push(c.get("_id").unwrap().clone());
        }
        for id in expect {
            eventually(&format!("{id} renamed on both sides at {to}%"), Duration::from_secs(60), || async {
                let m = monolith.find_one(doc! { "_id": &id }).await.unwrap();
                let s = service.find_one(doc! { "_id": &id }).await.unwrap();
                m.is_some_and(|m| m.get_str("user_name").ok() == Some(name.as_str()))
                    && s.is_some_and(|s| s.get_str("displayName").ok() == Some(name.as_str()))
            })
            .await;
        }
        for svc in ["conversations_db", "ai_sessions_db"] {
            let v = world.ficus(&["verify", "--checks", "counts,contents", "--service", svc, "--settle", "2"], &[]);
            assert!(v.status.success(), "verify {svc} after --to {to}:\n{}", text(&v));
        }
    }
    assert!(f.terminate().success(), "{}", f.logs());
}
