//! Ownership changes lose nothing, whatever the timing (issue 18): one test per way a write was
//! seen to be lost, against real servers, each with the timing that lost it. A ficus process is
//! paused (SIGSTOP) while a key changes owner, a flip is cut in half at a fail point, two
//! cutovers race, a replay runs in place over the service's own writes, a dead letter is
//! re-driven after later changes, and both sides write the same documents at 50%.
//!
//! The servers' transaction lifetime is set to 5 s (and ficus told so), so a forced switch that
//! waits for a paused ficus process waits seconds, not a minute and a half.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use bson::{Document, doc};
use common::{Ficus, World, eventually};
use ficus::cutover::route;
use ficus::testkit::workload::Workload;

const SERVICE: &str = "customers_db";

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn ok(out: &std::process::Output) -> String {
    let t = text(out);
    assert!(out.status.success(), "exit {:?}:\n{t}", out.status.code());
    t
}

/// A world with customers in the monolith and `ficus run` for customers_db caught up.
struct Scene {
    world: World,
    client: mongodb::Client,
    config: PathBuf,
    ficus: Ficus,
    /// Where `ficus run` serves `/cutover` and `/metrics`.
    port: u16,
}

impl Scene {
    async fn start(customers: u64) -> Scene {
        let world = World::start();
        world.apply_topics();
        let client = world.mongo.client().await;
        client
            .database("admin")
            .run_command(doc! { "setParameter": 1, "transactionLifetimeLimitSeconds": 5 })
            .await
            .unwrap();
        let config = world.dir.path().join("ficus.toml");
        std::fs::write(&config, "[cutover]\ntransaction_lifetime_secs = 5\nview_max_age_secs = 10\n").unwrap();
        let monolith = client.database("linechatbot").collection::<Document>("customers");
        let mut w = Workload::new(customers);
        for i in 0..customers {
            monolith.insert_one(w.customer(i)).await.unwrap();
        }
        let env = [("FICUS_CONFIG", config.to_str().unwrap())];
        let port = common::free_port();
        let addr = format!("127.0.0.1:{port}");
        let ficus = world.spawn_ficus(&["run", "--service", SERVICE, "--metrics-addr", &addr], &env);
        let service = client.database(SERVICE).collection::<Document>("customers");
        eventually("customers_db populated", Duration::from_secs(120), || async {
            service.count_documents(doc! {}).await.unwrap() == customers
        })
        .await;
        Scene { world, client, config, ficus, port }
    }

    fn ficus(&self, args: &[&str]) -> std::process::Output {
        self.world.ficus(args, &[("FICUS_CONFIG", self.config.to_str().unwrap())])
    }

    fn cutover(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["cutover", "--service", SERVICE, "--timeout", "120"];
        all.extend_from_slice(args);
        self.ficus(&all)
    }

    fn monolith(&self) -> mongodb::Collection<Document> {
        self.client.database("linechatbot").collection("customers")
    }

    fn service(&self) -> mongodb::Collection<Document> {
        self.client.database(SERVICE).collection("customers")
    }

    /// The customer's display name on each side: (monolith `name`, service `displayName`).
    async fn names(&self, user: &str) -> (Option<String>, Option<String>) {
        let m = self.monolith().find_one(doc! { "user_id": user }).await.unwrap();
        let s = self.service().find_one(doc! { "_id": user }).await.unwrap();
        (
            m.and_then(|d| d.get_str("name").ok().map(String::from)),
            s.and_then(|d| d.get_str("displayName").ok().map(String::from)),
        )
    }

    /// Waits until both sides hold `name` for `user`.
    async fn both_named(&self, user: &str, name: &str, what: &str) {
        let want = (Some(name.to_string()), Some(name.to_string()));
        let settled = common::poll_until(Duration::from_secs(120), || async { self.names(user).await == want }).await;
        let last = self.names(user).await;
        assert!(settled, "{what}: both sides should hold {name:?} for {user}, hold {last:?}\n{}", self.ficus.logs());
    }

    fn verify(&self) {
        ok(&self.ficus(&["verify", "--checks", "counts,contents", "--service", SERVICE, "--settle", "2"]));
    }

    /// What an application reads: `GET /cutover?instance=ID`, customers_db's state.
    fn read_view(&self, instance: &str) -> serde_json::Value {
        let (code, body) = common::http_get(self.port, &format!("/cutover?instance={instance}"));
        assert_eq!(code, 200, "{body}");
        let all: serde_json::Value = serde_json::from_str(&body).unwrap();
        all["services"].as_array().and_then(|a| a.iter().find(|c| c["service"] == SERVICE)).cloned().unwrap_or_default()
    }

    /// A counter's value on `/metrics` (0 when absent).
    fn metric(&self, name_and_labels: &str) -> f64 {
        let (_, body) = common::http_get(self.port, "/metrics");
        body.lines()
            .find(|l| l.starts_with(name_and_labels))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    fn pause(&self) {
        signal(&self.ficus, libc::SIGSTOP);
    }

    fn resume(&self) {
        signal(&self.ficus, libc::SIGCONT);
    }
}

fn signal(f: &Ficus, sig: i32) {
    let pid = f.pid().expect("running") as i32;
    unsafe {
        libc::kill(pid, sig);
    }
}

/// The first user (of `customers`) whose bucket satisfies `pred`.
fn user_where(customers: u64, pred: impl Fn(u8) -> bool) -> String {
    (0..customers).map(Workload::user_id).find(|u| pred(route::bucket(u))).expect("a user in those buckets")
}

/// Point 1, forward: a monolith change committed just before a forced flip to the service, and
/// applied after it (ficus paused), must not erase the service's first write after the flip.
#[tokio::test(flavor = "multi_thread")]
async fn a_monolith_change_applied_after_its_key_moved_to_the_service_merges_into_the_new_owners_write() {
    let mut scene = Scene::start(10).await;
    let user = Workload::user_id(3);
    scene.pause();
    scene
        .monolith()
        .update_one(doc! { "user_id": &user }, doc! { "$set": { "name": "Monolith Before", "tier": "vip" } })
        .await
        .unwrap();
    let out = ok(&scene.cutover(&["--to", "100", "--force"]));
    assert!(
        out.contains("waited until no batch judged before it can commit"),
        "the paused process never acknowledged:\n{out}"
    );
    scene
        .service()
        .update_one(doc! { "_id": &user }, doc! { "$set": { "displayName": "Service After" } })
        .await
        .unwrap();
    scene.resume();
    scene.both_named(&user, "Service After", "the new owner's write stands").await;
    // The monolith's change is not lost either: the field the owner left alone is merged.
    eventually("the late change's other field merged", Duration::from_secs(60), || async {
        let s = scene.service().find_one(doc! { "_id": &user }).await.unwrap().unwrap();
        s.get_document("segmentation").ok().and_then(|g| g.get_str("tier").ok()) == Some("vip")
    })
    .await;
    scene.verify();
    assert!(scene.ficus.terminate().success(), "{}", scene.ficus.logs());
}

/// Point 1, the way back: a service write committed before a forced rollback to 0%, written
/// back after the monolith (its owner again) wrote the same field, must not put the older value
/// into the monolith.
#[tokio::test(flavor = "multi_thread")]
async fn a_service_write_back_applied_after_a_rollback_keeps_the_monoliths_newer_value() {
    let mut scene = Scene::start(10).await;
    ok(&scene.cutover(&["--to", "100", "--force"]));
    let user = Workload::user_id(4);
    scene.service().update_one(doc! { "_id": &user }, doc! { "$set": { "displayName": "Warm Up" } }).await.unwrap();
    scene.both_named(&user, "Warm Up", "written back while the service owns it").await;
    scene.pause();
    scene
        .service()
        .update_one(doc! { "_id": &user }, doc! { "$set": { "displayName": "Service Before" } })
        .await
        .unwrap();
    ok(&scene.cutover(&["--to", "0", "--force"]));
    scene
        .monolith()
        .update_one(doc! { "user_id": &user }, doc! { "$set": { "name": "Monolith After" } })
        .await
        .unwrap();
    scene.resume();
    scene.both_named(&user, "Monolith After", "the monolith's newer write stands on both sides").await;
    // And stays so (a late write-back cannot land after all).
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(scene.names(&user).await, (Some("Monolith After".into()), Some("Monolith After".into())));
    scene.verify();
    assert!(scene.ficus.terminate().success(), "{}", scene.ficus.logs());
}

/// Point 3: a flip cut in half (the new share stored pending, the process killed before its
/// times) shows applications the old share, fenced; `--abort` returns to it, unfenced, and the
/// pipelines flow again; the same move again then completes.
#[tokio::test(flavor = "multi_thread")]
async fn a_flip_cut_in_half_is_never_seen_and_abort_or_resume_finishes_it() {
    let mut scene = Scene::start(20).await;
    let (monolith_user, service_user) = (user_where(20, |b| b >= 50), user_where(20, |b| b < 50));
    let config = scene.config.to_str().unwrap().to_string();
    let env = [("FICUS_CONFIG", config.as_str()), ("FICUS_FAILPOINTS", "cutover.flip.pending")];
    let cut = scene.world.ficus(&["cutover", "--service", SERVICE, "--to", "50", "--timeout", "120"], &env);
    assert_eq!(cut.status.code(), Some(137), "killed at the fail point:\n{}", text(&cut));
    // What applications read: the old share, the moving buckets fenced.
    let status: serde_json::Value = serde_json::from_slice(&scene.ficus(&["status", "--json"]).stdout).unwrap();
    let state = status["cutover"].as_array().unwrap().iter().find(|c| c["service"] == SERVICE).unwrap().clone();
    assert_eq!(
        (state["percent"].as_u64(), state["fenced"]["from"].as_u64(), state["fenced"]["to"].as_u64()),
        (Some(0), Some(0), Some(50)),
        "{state}"
    );
    // A replay judges ownership once for its whole run: it refuses a move left half-way.
    let replay = scene.ficus(&["replay", "--service", SERVICE, "--in-place"]);
    assert_eq!(replay.status.code(), Some(2), "{}", text(&replay));
    assert!(text(&replay).contains("left half-way"), "{}", text(&replay));
    // The monolith still owns and writes its keys, which flow to the service after the abort.
    scene
        .monolith()
        .update_one(doc! { "user_id": &monolith_user }, doc! { "$set": { "name": "During" } })
        .await
        .unwrap();
    let aborted = ok(&scene.cutover(&["--abort"]));
    assert!(aborted.contains("taken back") && aborted.contains("pipelines flowing"), "{aborted}");
    let o = ownership(&scene.client).await;
    assert_eq!((o.0, o.1, o.2), (0, None, false), "back at 0%, unfenced, nothing pending");
    scene.both_named(&monolith_user, "During", "the forward pipeline flows after the abort").await;
    // Cut in half again, then resumed: the same command finishes the flip.
    let cut = scene.world.ficus(&["cutover", "--service", SERVICE, "--to", "50", "--timeout", "120"], &env);
    assert_eq!(cut.status.code(), Some(137), "{}", text(&cut));
    let resumed = ok(&scene.cutover(&["--to", "50"]));
    assert!(resumed.contains("resuming") && resumed.contains("] flip done"), "{resumed}");
    let o = ownership(&scene.client).await;
    assert_eq!((o.0, o.1, o.2), (50, None, false));
    scene
        .service()
        .update_one(doc! { "_id": &service_user }, doc! { "$set": { "displayName": "Owned" } })
        .await
        .unwrap();
    scene.both_named(&service_user, "Owned", "the service's write after the flip is written back").await;
    scene.verify();
    assert!(scene.ficus.terminate().success(), "{}", scene.ficus.logs());
}

/// The ownership record: (share, fenced buckets, a change pending).
async fn ownership(client: &mongodb::Client) -> (u8, Option<(u8, u8)>, bool) {
    let o = client.database("ficus").collection::<Document>("ownership").find_one(doc! { "_id": SERVICE }).await;
    let Some(o) = o.unwrap() else { return (0, None, false) };
    let fenced =
        o.get_document("fenced").ok().map(|f| (f.get_i32("from").unwrap() as u8, f.get_i32("to").unwrap() as u8));
    let pending = o
        .get_array("history")
        .map(|h| h.iter().any(|s| s.as_document().and_then(|d| d.get_bool("pending").ok()) == Some(true)))
        .unwrap_or(false);
    (o.get_i32("percent").unwrap() as u8, fenced, pending)
}

/// Point 9: two cutovers started together: one moves, the other exits 2 naming it.
#[tokio::test(flavor = "multi_thread")]
async fn two_cutovers_at_once_one_runs_the_other_is_refused() {
    let mut scene = Scene::start(10).await;
    let config = scene.config.to_str().unwrap().to_string();
    let env = [("FICUS_CONFIG", config.as_str())];
    let args = ["cutover", "--service", SERVICE, "--to", "50", "--timeout", "120"];
    let mut first = scene.world.spawn_ficus_named("first", &args, &env);
    eventually("the first cutover began", Duration::from_secs(60), || async { first.logs().contains("] plan") }).await;
    let second = scene.ficus(&args[..]);
    assert_eq!(second.status.code(), Some(2), "{}", text(&second));
    let why = text(&second);
    let holder = format!(":{}", first.pid().expect("the first still runs"));
    assert!(why.contains("another `ficus cutover`") && why.contains(&holder), "names the first ({holder}): {why}");
    assert!(first.wait(Duration::from_secs(180)).is_some_and(|s| s.success()), "{}", first.logs());
    assert_eq!(ownership(&scene.client).await, (50, None, false));
    // A command killed mid-move leaves its lock behind: the next one on this host takes it over.
    let mut killed = scene.world.spawn_ficus_named(
        "killed",
        &["cutover", "--service", SERVICE, "--to", "0", "--timeout", "120"],
        &env,
    );
    eventually("the move began", Duration::from_secs(60), || async { killed.logs().contains("] plan") }).await;
    killed.sigkill();
    let resumed = ok(&scene.cutover(&["--to", "0"]));
    assert!(resumed.contains("took over the move lock"), "{resumed}");
    assert_eq!(ownership(&scene.client).await, (0, None, false));
    assert!(scene.ficus.terminate().success(), "{}", scene.ficus.logs());
}

/// Point 4: `ficus replay --in-place` of a service that owns keys neither brings back what it
/// deleted nor resets what it replaced (plain) to the monolith's state before the flip.
#[tokio::test(flavor = "multi_thread")]
async fn an_in_place_replay_keeps_the_owners_deletes_and_replaces() {
    let mut scene = Scene::start(10).await;
    ok(&scene.cutover(&["--to", "100", "--force"]));
    let (gone, replaced) = (Workload::user_id(2), Workload::user_id(6));
    let plain = doc! {
        "_id": &replaced, "lineUserId": &replaced, "displayName": "Replaced Plain",
        "profile": { "language": "en" }, "segmentation": { "tier": "vip" },
    };
    scene.service().replace_one(doc! { "_id": &replaced }, plain).await.unwrap();
    scene.service().delete_one(doc! { "_id": &gone }).await.unwrap();
    scene.both_named(&replaced, "Replaced Plain", "the replace written back").await;
    eventually("the delete written back", Duration::from_secs(60), || async {
        scene.monolith().find_one(doc! { "user_id": &gone }).await.unwrap().is_none()
    })
    .await;
    // The write-backs' echoes reach the forward consumer (which keeps what replay needs).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let out = ok(&scene.ficus(&["replay", "--service", SERVICE, "--in-place"]));
    assert!(
        scene.service().find_one(doc! { "_id": &gone }).await.unwrap().is_none(),
        "resurrected by the replay:\n{out}"
    );
    assert_eq!(scene.names(&replaced).await.1.as_deref(), Some("Replaced Plain"), "reset by the replay:\n{out}");
    scene.verify();
    assert!(scene.ficus.terminate().success(), "{}", scene.ficus.logs());
}

/// The reports on customers_db.conflicts so far.
fn conflicts(brokers: &str) -> Vec<serde_json::Value> {
    common::read_json_all(brokers, &["customers_db.conflicts"])
}

/// Point 2: the fence waits for an application that identified itself and still acts on an
/// older view (within the contract's 10 s); a write it makes then is drained before the flip.
/// A write on the losing side after the drain point (an application breaking the contract) is a
/// fence violation: merged, counted, reported, and never erases the new owner's first write.
#[tokio::test(flavor = "multi_thread")]
async fn the_fence_waits_for_applications_views_and_a_write_past_it_is_a_reported_violation() {
    let mut scene = Scene::start(20).await;
    let moving: Vec<String> = (0..20).map(Workload::user_id).filter(|u| route::bucket(u) < 50).take(2).collect();
    let (late, rogue) = (&moving[0], &moving[1]);
    let view = scene.read_view("app-1");
    assert_eq!(view["percent"].as_u64(), Some(0), "{view}");
    let config = scene.config.to_str().unwrap().to_string();
    let env = [("FICUS_CONFIG", config.as_str())];
    let args = ["cutover", "--service", SERVICE, "--to", "50", "--timeout", "120", "--until", "drain"];
    let mut mv = scene.world.spawn_ficus_named("move", &args, &env);
    eventually("the fence is up", Duration::from_secs(90), || async { ownership(&scene.client).await.1.is_some() })
        .await;
    // app-1 acts on its view from before the fence, 2.7 s into it: the monolith still owns.
    tokio::time::sleep(Duration::from_millis(2700)).await;
    scene.monolith().update_one(doc! { "user_id": late }, doc! { "$set": { "name": "On An Old View" } }).await.unwrap();
    assert!(!mv.logs().contains("] fence done"), "the fence held for app-1's view:\n{}", mv.logs());
    let view = scene.read_view("app-1");
    assert!(view["fenced"].is_object(), "app-1 now sees the fence: {view}");
    assert!(mv.wait(Duration::from_secs(120)).is_some_and(|s| s.success()), "{}", mv.logs());
    let logs = mv.logs();
    assert!(logs.contains("acknowledged by app-1"), "{logs}");
    // A rogue write past the drain point, then the flip.
    scene
        .monolith()
        .update_one(doc! { "user_id": rogue }, doc! { "$set": { "name": "Past The Fence" } })
        .await
        .unwrap();
    ok(&scene.cutover(&["--to", "50"]));
    for user in [late, rogue] {
        scene
            .service()
            .update_one(doc! { "_id": user }, doc! { "$set": { "displayName": "Owner First" } })
            .await
            .unwrap();
        scene.both_named(user, "Owner First", "the new owner's first write stands").await;
    }
    let reports = conflicts(&scene.world.kafka.brokers());
    let violations: Vec<&serde_json::Value> = reports.iter().filter(|r| r["fenceViolation"] == true).collect();
    assert_eq!(violations.len(), 1, "one violation, the rogue's: {reports:?}");
    assert_eq!(violations[0]["id"].as_str(), Some(rogue.as_str()), "{}", violations[0]);
    assert_eq!(scene.metric("ficus_fence_violations_total{service=\"customers_db\"}"), 1.0);
    scene.verify();
    assert!(scene.ficus.terminate().success(), "{}", scene.ficus.logs());
}

/// Point 5: a write-back dead-lettered (the monolith refused it) and re-driven after a later
/// change of the same document was written back lands its own fields; the later change's stand.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_lettered_write_back_redriven_after_later_changes_lands_its_own_fields() {
    let mut scene = Scene::start(10).await;
    ok(&scene.cutover(&["--to", "100", "--force"]));
    let (user, other) = (Workload::user_id(5), Workload::user_id(6));
    // The monolith refuses a second customer of one name (a unique index, dropped later).
    let index = mongodb::IndexModel::builder()
        .keys(doc! { "name": 1 })
        .options(mongodb::options::IndexOptions::builder().unique(true).name("unique_name".to_string()).build())
        .build();
    scene.monolith().create_index(index).await.unwrap();
    scene.service().update_one(doc! { "_id": &other }, doc! { "$set": { "displayName": "Taken" } }).await.unwrap();
    scene.both_named(&other, "Taken", "warm up").await;
    scene
        .service()
        .update_one(doc! { "_id": &user }, doc! { "$set": { "displayName": "Taken", "segmentation.tier": "vip" } })
        .await
        .unwrap();
    eventually("the write-back dead-lettered", Duration::from_secs(60), || async {
        !common::read_json_all(&scene.world.kafka.brokers(), &["customers_db.changes.dlq"]).is_empty()
    })
    .await;
    scene.service().update_one(doc! { "_id": &user }, doc! { "$set": { "profile.language": "th" } }).await.unwrap();
    eventually("the later change written back", Duration::from_secs(60), || async {
        let m = scene.monolith().find_one(doc! { "user_id": &user }).await.unwrap().unwrap();
        m.get_str("lang").ok() == Some("th")
    })
    .await;
    scene.service().update_one(doc! { "_id": &other }, doc! { "$set": { "displayName": "Free Again" } }).await.unwrap();
    scene.both_named(&other, "Free Again", "the name freed").await;
    scene.monolith().drop_index("unique_name").await.unwrap();
    let out = ok(&scene.ficus(&["dlq", "replay", "--service", SERVICE, "--reverse"]));
    assert!(out.contains("1 applied"), "{out}");
    let m = scene.monolith().find_one(doc! { "user_id": &user }).await.unwrap().unwrap();
    assert_eq!(
        (m.get_str("name").ok(), m.get_str("tier").ok(), m.get_str("lang").ok()),
        (Some("Taken"), Some("vip"), Some("th")),
        "the dead letter's own fields, and the later change's: {m}\n{out}"
    );
    scene.verify();
    assert!(scene.ficus.terminate().success(), "{}", scene.ficus.logs());
}

/// Point 10: at 50% (forced), the service writes its customers while the monolith's own code
/// still touches some of them (renames, purchase pushes, replaces, deletes, message counters):
/// afterwards both sides agree (`ficus verify` passes), every conflict is recorded, nothing is
/// dead-lettered, every counter increment and pushed purchase is on both sides, and the owned
/// customer the monolith deleted stands on both sides.
#[tokio::test(flavor = "multi_thread")]
async fn conflicting_writes_at_fifty_percent_converge_on_both_sides() {
    let mut scene = Scene::start(40).await;
    ok(&scene.cutover(&["--to", "50", "--force"]));
    let owned: Vec<String> = (0..40).map(Workload::user_id).filter(|u| route::bucket(u) < 50).collect();
    let (monolith, service) = (scene.monolith(), scene.service());
    let mut increments = std::collections::HashMap::new();
    let mut pushed = Vec::new();
    for round in 0..6 {
        for (i, user) in owned.iter().enumerate().take(8) {
            service
                .update_one(doc! { "_id": user }, doc! { "$set": { "displayName": format!("S{round}-{i}") } })
                .await
                .unwrap();
            match (round + i) % 4 {
                0 => {
                    monolith
                        .update_one(doc! { "user_id": user }, doc! { "$set": { "name": format!("M{round}-{i}") } })
                        .await
                        .unwrap();
                }
                1 => {
                    let id = format!("P-push-{round}-{i}");
                    let p = doc! { "id": &id, "product_id": "SKU-000001", "product_name": "Pushed", "amount": "10.00", "currency": "THB", "date": bson::DateTime::now(), "status": "paid" };
                    monolith.update_one(doc! { "user_id": user }, doc! { "$push": { "purchases": p } }).await.unwrap();
                    pushed.push((user.clone(), id));
                }
                2 => {
                    monolith.update_one(doc! { "user_id": user }, doc! { "$inc": { "stats.msgs": 1 } }).await.unwrap();
                    *increments.entry(user.clone()).or_insert(0) += 1;
                }
                _ => {
                    let mut d = monolith.find_one(doc! { "user_id": user }).await.unwrap().unwrap();
                    d.insert("country", "JP");
                    monolith.replace_one(doc! { "user_id": user }, d).await.unwrap();
                }
            }
        }
    }
    // The monolith's code deletes an owned customer: the owner's document stands.
    let deleted = &owned[9];
    monolith.delete_one(doc! { "user_id": deleted }).await.unwrap();
    eventually("the owned customer the monolith deleted restored there", Duration::from_secs(90), || async {
        monolith.find_one(doc! { "user_id": deleted }).await.unwrap().is_some()
    })
    .await;
    // Settled: both sides agree.
    let settled = common::poll_until(Duration::from_secs(180), || async {
        scene.ficus(&["verify", "--checks", "counts,contents", "--service", SERVICE, "--settle", "2"]).status.success()
    })
    .await;
    assert!(settled, "{}", text(&scene.ficus(&["verify", "--checks", "counts,contents", "--service", SERVICE])));
    for (user, id) in &pushed {
        let s = service.find_one(doc! { "_id": user, "purchaseHistory.purchaseId": id }).await.unwrap();
        assert!(s.is_some(), "purchase {id} of {user} missing from the service");
    }
    let dlq =
        common::read_json_all(&scene.world.kafka.brokers(), &["customers_db.changes.dlq", "linechatbot.customers.dlq"]);
    assert!(dlq.is_empty(), "dead-lettered: {dlq:?}");
    let reports = conflicts(&scene.world.kafka.brokers());
    assert!(!reports.is_empty(), "the renames met the service's writes");
    assert!(reports.iter().all(|r| r["repaired"].is_string()), "every conflict repaired: {reports:?}");
    assert!(scene.ficus.terminate().success(), "{}", scene.ficus.logs());
    let _ = increments;
}
