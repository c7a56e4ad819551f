//! Faults of ficus's own processes, while a seeded workload writes to the monolith: SIGKILL at
//! seeded random moments of the snapshot, streaming, consumption and `ficus replay`; processes
//! restarted in place as the same static group member; two processes given one instance id;
//! two writers of one service database racing. Each scenario runs in its own world and ends
//! with the audit of `tests/common/scenario` (nothing lost, one line per scenario); the fault
//! families, the knobs (`FICUS_FAULTS_LONG`, `FICUS_FAULTS_SEED`, …) and what the line counts are
//! in the README, "Faults, and what the tests prove".

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use bson::{Bson, Document, doc};
use common::Ficus;
use common::scenario::audit::{Report, converge, differences};
use common::scenario::{ALL, CONSUME, Setup, TAIL, announce, long, plain, stop_cleanly, tail_of, text};
use futures::TryStreamExt;
use rand::Rng;

// ---------------------------------------------------------------------------------------------
// SIGKILL at random moments
// ---------------------------------------------------------------------------------------------

/// The tail and the consumers (with the archive) run as two processes; a seeded schedule kills
/// one, the other or both with SIGKILL at random moments while the workload streams, and
/// restarts them.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_streaming_and_consumption() {
    let mut s = Setup::seeded("sigkill-streaming").start().await;
    let mut driver = s.driver();
    driver.seed(150, 100).await;

    let mut tail = s.spawn(TAIL);
    let mut consume = s.spawn(CONSUME);
    s.wait_streaming().await;

    let writer = driver.until_stopped(Duration::from_millis(15));
    let cycles = if long() { 24 } else { 5 };
    let mut kills = BTreeMap::new();
    for _ in 0..cycles {
        tokio::time::sleep(Duration::from_millis(s.rng.random_range(700..2500))).await;
        let victim = ["tail", "consume", "both"][s.rng.random_range(0..3)];
        *kills.entry(victim).or_insert(0) += 1;
        if victim != "consume" {
            tail.sigkill();
        }
        if victim != "tail" {
            consume.sigkill();
        }
        // Restart at once or after a short outage.
        tokio::time::sleep(Duration::from_millis(s.rng.random_range(0..800))).await;
        if victim != "consume" {
            tail = s.spawn(TAIL);
        }
        if victim != "tail" {
            consume = s.spawn(CONSUME);
        }
    }
    let driver = writer.stop().await;

    let mut report = s.audit(&driver.log).note(format!("seed {}, {cycles} SIGKILLs: {kills:?}", s.seed)).run().await;
    report.finish(&mut tail, "the tail");
    report.finish(&mut consume, "the consumers");
    report.check();
}

/// SIGKILL at random moments of a throttled initial snapshot (tail, consumers and archive in
/// one process), with writes landing during the copy; each restart resumes the copy.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_the_snapshot() {
    let rate = if long() { 300 } else { 150 };
    let snapshot = format!("[snapshot]\nmax_docs_per_sec = {rate}\nbatch_size = 25\n");
    let mut s = Setup::seeded("sigkill-snapshot").config(&snapshot).start().await;
    let (products, customers) = if long() { (1500, 500) } else { (450, 150) };
    let mut driver = s.driver();
    driver.seed(products, customers).await;

    let copied = || async {
        common::checkpoint(&s.target, "linechatbot")
            .await
            .and_then(|c| c.get_document("snapshot").ok().and_then(|s| s.get_i64("copied").ok()))
    };
    let mut f = s.spawn(ALL);
    s.wait("the snapshot started", Duration::from_secs(60), || async { copied().await.is_some() }).await;
    let writer = driver.until_stopped(Duration::from_millis(20));
    let cycles = if long() { 20 } else { 3 };
    let mut mid_copy = 0;
    for _ in 0..cycles {
        // Kill once the copy has moved on, somewhere in its next stretch.
        let before = copied().await;
        s.wait("snapshot progress", Duration::from_secs(60), || async {
            copied().await > before || s.streaming().await
        })
        .await;
        let pause = Duration::from_millis(s.rng.random_range(0..400));
        tokio::time::sleep(pause).await;
        f.sigkill();
        if !s.streaming().await {
            mid_copy += 1;
        }
        f = s.spawn(ALL);
    }
    s.wait("the snapshot finished", Duration::from_secs(120), || s.streaming()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let driver = writer.stop().await;
    assert!(mid_copy > 0, "no SIGKILL landed mid-copy: make the copy slower");

    let note = format!("seed {}, {cycles} SIGKILLs, {mid_copy} of them mid-copy", s.seed);
    let mut report = s.audit(&driver.log).note(note).run().await;
    report.finish(&mut f, "ficus");
    report.check();
}

/// `ficus replay` killed with SIGKILL at random moments (shadow and in-place) while the daemon
/// keeps consuming live writes; a final replay completes and the database verifies.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_replay() {
    let mut s = Setup::seeded("sigkill-replay").start().await;
    let mut driver = s.driver();
    driver.seed(if long() { 800 } else { 250 }, 100).await;
    let mut f = s.spawn(ALL);
    s.wait_streaming().await;
    let driver = driver.run(200, Duration::from_millis(10)).await;
    s.wait("the service databases caught up", Duration::from_secs(240), || async {
        differences(&s.source, &s.target).await.is_empty()
    })
    .await;

    // A fixed number of writes through the kills and the final replay (which may outlast them).
    let writer = driver.in_background(if long() { 1500 } else { 300 }, Duration::from_millis(40));
    let cycles = if long() { 20 } else { 3 };
    let mut interrupted = 0;
    for cycle in 0..cycles {
        let args: &[&str] = if cycle % 3 == 2 {
            &["replay", "--service", "products_db", "--in-place"]
        } else {
            &["replay", "--service", "products_db"]
        };
        let mut r = s.spawn(args);
        tokio::time::sleep(Duration::from_millis(s.rng.random_range(200..2500))).await;
        if r.wait(Duration::ZERO).is_none() {
            interrupted += 1;
        }
        r.sigkill();
    }
    let out = s.run(&["replay", "--service", "products_db"]);
    assert!(out.status.success(), "the final replay failed:\n{}", text(&out));
    let final_replay = plain(&text(&out));
    let driver = writer.join().await;
    assert!(interrupted > 0, "no replay was interrupted");
    let leftovers = s.target.list_database_names().await.unwrap();
    assert!(!leftovers.iter().any(|d| d == "products_db_replay"), "the shadow database was left behind: {leftovers:?}");

    let note = format!("seed {}, {cycles} replays SIGKILLed, {interrupted} of them mid-run", s.seed);
    let mut report = s.audit(&driver.log).note(note).run().await;
    if !report.problems.is_empty() {
        report.problems.insert(0, format!("the final replay said:\n{}", tail_of(&final_replay, 25)));
    }
    report.finish(&mut f, "ficus");
    report.check();
}

// ---------------------------------------------------------------------------------------------
// Static group membership: a process that restarts in place is the same member
// ---------------------------------------------------------------------------------------------

/// Every consumer group of a `ficus run` with every service: one per service, and the archive.
fn every_group() -> Vec<String> {
    let root = common::repo_root();
    let topics = ficus::config::topics::load(&root.join("topics")).unwrap();
    let services = ficus::transform::load_all(&root.join("transforms"), &topics).unwrap();
    let mut groups: Vec<String> = services.iter().map(|s| format!("ficus.{}", s.service())).collect();
    groups.push("ficus.archive".into());
    groups
}

/// Groups in which the process `pid` holds no partition, per what its members report in the
/// store (`<store.db>.consumers`, renewed every 5 s).
async fn groups_without_partitions(store: &mongodb::Client, groups: &[String], pid: u32) -> Vec<String> {
    let members: Vec<Document> = store
        .database("ficus")
        .collection::<Document>("consumers")
        .find(doc! { "pid": i64::from(pid), "partitions": { "$gt": 0_i64 } })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let holding: HashSet<&str> = members.iter().filter_map(|m| m.get_str("group").ok()).collect();
    groups.iter().filter(|g| !holding.contains(g.as_str())).cloned().collect()
}

/// Waits until the process holds partitions in every group; how long that took, or the groups
/// that still had none after `timeout`.
async fn until_every_group_consumes(
    store: &mongodb::Client,
    groups: &[String],
    f: &Ficus,
    timeout: Duration,
) -> Result<Duration, Vec<String>> {
    let pid = f.pid().expect("running");
    let t0 = Instant::now();
    loop {
        let missing = groups_without_partitions(store, groups, pid).await;
        if missing.is_empty() {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > timeout {
            return Err(missing);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The two scenarios that restart static group members run one at a time: on Tansu 0.6.0 a
/// rebalance of a loaded group stalls its coordinator (members' heartbeats went unanswered for
/// a whole 45 s session, `Timed out 8 in-flight` on the coordinator connection), and with both
/// scenarios' brokers and processes on CI's two cores at once that happened within minutes.
static STATIC_MEMBERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The only ficus process (every role, every service, as under systemd or in a one-replica
/// Deployment) is SIGKILLed and restarted while the workload writes. Each time, every one of
/// its eight consumer groups must consume again within seconds: the restarted process is the
/// same static member and gets its partitions straight back. (With dynamic membership Tansu
/// never evicts the dead member and the new one is assigned nothing, for good.)
#[tokio::test(flavor = "multi_thread")]
async fn a_lone_ficus_run_killed_and_restarted_consumes_again_at_once() {
    let _one_at_a_time = STATIC_MEMBERS.lock().await;
    let mut s = Setup::seeded("sigkill-lone-run").start().await;
    let mut driver = s.driver();
    driver.seed(100, 50).await;
    let every = ["run", "--batch-max", "100"];
    let groups = every_group();

    let mut f = s.spawn(&every);
    s.wait_streaming().await;
    let writer = driver.until_stopped(Duration::from_millis(15));
    let first = until_every_group_consumes(&s.target, &groups, &f, Duration::from_secs(60)).await;
    let mut problems = Vec::new();
    if let Err(missing) = &first {
        problems.push(format!("at first start, no partitions in {missing:?}"));
    }
    let cycles = if long() { 20 } else { 5 };
    let mut rejoined = Vec::new();
    for cycle in 0..cycles {
        tokio::time::sleep(Duration::from_millis(s.rng.random_range(1500..4000))).await;
        f.sigkill();
        f = s.spawn(&every);
        // Well under the 6 s session a dynamic member's successor would wait for (and on Tansu,
        // wait for ever): the registry is renewed every 5 s, so allow one renewal and a join.
        match until_every_group_consumes(&s.target, &groups, &f, Duration::from_secs(30)).await {
            Ok(took) => rejoined.push(took.as_millis()),
            Err(missing) => problems.push(format!("restart {cycle}: after 30 s no partitions in {missing:?}")),
        }
    }
    let driver = writer.stop().await;
    let note = format!(
        "seed {}, {cycles} SIGKILLs of the only process; every group consuming again after (ms) {rejoined:?}",
        s.seed
    );
    let mut report = s.audit(&driver.log).note(note).run().await;
    if !problems.is_empty() {
        problems.push(s.problems());
    }
    report.problems.extend(problems);
    report.finish(&mut f, "ficus");
    report.check();
}

/// `--roles consume` processes only, the tail in its own process. First `a` alone (instance id
/// `a`) is SIGKILLed and restarted with nobody else in its groups; then `b` joins and is
/// SIGKILLed and restarted while `a` stays alive (the group rebalances around it and back).
/// Every restart gets partitions back, and nothing is lost. (The order matters on Tansu 0.6.0:
/// a member that departs for good leaves, as a static member, no LeaveGroup behind, and if it
/// was the group's leader Tansu keeps it so when its session ends mid-rebalance: the group
/// wedges. See the README's caveats.)
#[tokio::test(flavor = "multi_thread")]
async fn consumers_restarted_beside_a_live_member_and_alone_get_their_partitions_back() {
    let _one_at_a_time = STATIC_MEMBERS.lock().await;
    let mut s = Setup::seeded("sigkill-consume-members").start().await;
    let (env_a, env_b) =
        (s.env.clone().with("FICUS_KAFKA_INSTANCE_ID", "a"), s.env.clone().with("FICUS_KAFKA_INSTANCE_ID", "b"));
    let mut driver = s.driver();
    driver.seed(100, 50).await;
    let consume =
        ["run", "--roles", "consume", "--service", "products_db", "--service", "customers_db", "--batch-max", "100"];
    let groups = ["ficus.products_db".to_string(), "ficus.customers_db".to_string()];

    let mut tail = s.spawn(TAIL);
    let mut a = s.spawn_with(&consume, &env_a);
    s.wait_streaming().await;
    // A steady trickle: what is tested is the members' restarts, and this scenario runs for
    // minutes (at the other scenarios' 15 ms, 10,000 writes, and a broker slowing with them).
    let writer = driver.until_stopped(Duration::from_millis(40));
    let mut problems = Vec::new();
    if let Err(missing) = until_every_group_consumes(&s.target, &groups, &a, Duration::from_secs(60)).await {
        problems.push(format!("a at first start: no partitions in {missing:?}"));
    }
    let cycles = if long() { 10 } else { 3 };
    for cycle in 0..cycles {
        tokio::time::sleep(Duration::from_millis(s.rng.random_range(1500..3000))).await;
        a.sigkill();
        a = s.spawn_with(&consume, &env_a);
        if let Err(missing) = until_every_group_consumes(&s.target, &groups, &a, Duration::from_secs(30)).await {
            problems.push(format!("a, restart {cycle} alone: after 30 s no partitions in {missing:?}"));
        }
    }
    // A new static member beside a live one. On Tansu 0.6.0 its first cooperative rebalance
    // can leave it with nothing: `a` revokes the partitions meant for `b`, and the second round
    // never hands them over (seen for 100 s, with nobody consuming them). Restarting the new
    // member completes it (README, caveats), so that is what an operator does and what is held
    // here: partitions within two minutes of joining, or within a minute of one restart. (Two
    // minutes: a rebalance needs `a` to poll, and `a` may be retrying a write that conflicts
    // with the open transaction of its own SIGKILLed predecessor, which the server aborts only
    // after 60 s, with up to ~45 s of backoff on top.)
    let mut b = s.spawn_with(&consume, &env_b);
    let first_join = match until_every_group_consumes(&s.target, &groups, &b, Duration::from_secs(120)).await {
        Ok(took) => format!("b's first join consumed after {:.0}s", took.as_secs_f64()),
        Err(_) => {
            b.sigkill();
            b = s.spawn_with(&consume, &env_b);
            if let Err(missing) = until_every_group_consumes(&s.target, &groups, &b, Duration::from_secs(60)).await {
                problems.push(format!("b joining a: no partitions in {missing:?} in 120 s, nor 60 s after a restart"));
            }
            "b's first join got nothing in 120 s (Tansu 0.6.0), its restart did".to_string()
        }
    };
    for cycle in 0..cycles {
        tokio::time::sleep(Duration::from_millis(s.rng.random_range(1500..3000))).await;
        b.sigkill();
        b = s.spawn_with(&consume, &env_b);
        if let Err(missing) = until_every_group_consumes(&s.target, &groups, &b, Duration::from_secs(30)).await {
            problems.push(format!("b, restart {cycle} beside a live a: after 30 s no partitions in {missing:?}"));
        }
    }
    let driver = writer.stop().await;
    // Both members stop (cleanly) once the services have caught up, before the audit reads
    // Kafka back: with two live static members in each group, Tansu 0.6.0 answered that
    // third client's fetches with nothing for three minutes, twice in a row (ficus had
    // converged; the audit had not begun).
    let caught_up = converge(&s.source, &s.target).await.is_empty();
    let mut stopped = Report::default();
    stopped.finish(&mut b, "consumer b");
    stopped.finish(&mut a, "consumer a");
    let note = format!("seed {}, {cycles} restarts of a alone, {cycles} of b beside a; {first_join}", s.seed);
    let mut report = s.audit(&driver.log).without_archive().note(note).run().await;
    if !caught_up {
        problems.push("the services had not caught up when the members stopped".into());
    }
    problems.extend(stopped.problems);
    if !problems.is_empty() {
        problems.push(s.problems());
    }
    report.problems.extend(problems);
    report.finish(&mut tail, "the tail");
    report.check();
}

/// Two live processes configured with one `kafka.instance_id` would fence each other in turn:
/// the second one stops before it joins, with exit 2 and a message naming the setting, and
/// the first goes on undisturbed.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_process_with_the_same_instance_id_stops_with_exit_2() {
    let mut s = Setup::new("instance-id-twice").default_config().start().await;
    s.env = s.env.clone().with("FICUS_KAFKA_INSTANCE_ID", "slot-1");
    let consume = ["run", "--roles", "consume", "--service", "products_db"];
    let mut first = s.spawn(&consume);
    let groups = ["ficus.products_db".to_string()];
    if let Err(missing) = until_every_group_consumes(&s.target, &groups, &first, Duration::from_secs(60)).await {
        panic!("the first process never consumed {missing:?}:\n{}", first.logs());
    }
    let mut second = s.spawn(&consume);
    let status = tokio::task::block_in_place(|| second.wait(Duration::from_secs(60)))
        .unwrap_or_else(|| panic!("the second process did not stop:\n{}", second.logs()));
    let logs = plain(&second.logs());
    assert_eq!(status.code(), Some(2), "exit status {status:?}:\n{logs}");
    assert!(logs.contains("kafka.instance_id `slot-1`") && logs.contains("ficus.products_db"), "{logs}");
    assert!(logs.contains(&format!("pid {}", first.pid().unwrap())), "names the live holder:\n{logs}");
    // The first never noticed: still running, still the member.
    assert!(first.wait(Duration::ZERO).is_none(), "{}", first.logs());
    let still = groups_without_partitions(&s.target, &groups, first.pid().unwrap()).await;
    assert!(still.is_empty(), "the first process lost its partitions: {still:?}\n{}", first.logs());
    assert!(!first.logs().contains("fenced"), "{}", first.logs());
    // Another instance id joins the same group beside it.
    let other_env = s.env.clone().with("FICUS_KAFKA_INSTANCE_ID", "slot-2");
    let mut other = s.spawn_with(&consume, &other_env);
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(other.wait(Duration::ZERO).is_none(), "{}", other.logs());
    stop_cleanly(&mut other, "the second instance id");
    stop_cleanly(&mut first, "the first process");
}

// ---------------------------------------------------------------------------------------------
// Two writers of one service database
// ---------------------------------------------------------------------------------------------

/// Two writers of one service database apply the same aggregates' events at once: the live
/// consumer and a replay's catch-up (seen in `sigkill_during_replay`), or a partition's old and
/// new owner around a rebalance. Each aggregate gets an upsert from one writer and the newer
/// delete from the other, concurrently. Whatever the interleaving, the version guards promise
/// that the older write never wins: no document may survive its newer delete.
#[tokio::test(flavor = "multi_thread")]
async fn an_older_upsert_racing_a_newer_delete_never_resurrects_the_document() {
    use ficus::sink::{MongoSink, Sink, Versioned};
    use ficus::transform::WriteOp;
    let name = "sink-race";
    let dir = tempfile::Builder::new().prefix("ficus-test-").tempdir().unwrap();
    let mongo = common::Mongo::start(&dir.path().join("mongo"), &[]);
    let client = mongo.client().await;
    let collections = std::collections::BTreeSet::from(["things".to_string()]);
    let ttl = Duration::from_secs(86_400);
    let live = MongoSink::open(client.clone(), "race_db", &collections, &[], ttl).await.unwrap();
    let replay = MongoSink::open(client.clone(), "race_db", &collections, &[], ttl).await.unwrap();
    let event = |key: usize, n: u32, op: WriteOp| Versioned {
        version: ficus::event::Version::at(bson::Timestamp { time: 1_800_000_000, increment: key as u32 }, n),
        event_id: format!("e-{key}-{n}"),
        source_collection: "things".into(),
        source_id: Bson::String(format!("K{key}")),
        event_time: bson::DateTime::now(),
        ops: vec![op],
        redriven: false,
    };
    const KEYS: usize = if cfg!(debug_assertions) { 400 } else { 2000 };
    for key in 0..KEYS {
        let id = Bson::String(format!("K{key}"));
        let upsert =
            event(key, 1, WriteOp::Upsert { collection: "things".into(), id: id.clone(), doc: doc! { "n": 1 } });
        let delete = event(key, 2, WriteOp::Delete { collection: "things".into(), id: Some(id) });
        // Half the time the older upsert starts first, half the time the newer delete does.
        let (a, b) = if key % 2 == 0 {
            tokio::join!(
                live.apply(std::slice::from_ref(&upsert), None),
                replay.apply(std::slice::from_ref(&delete), None)
            )
        } else {
            let (b, a) = tokio::join!(
                replay.apply(std::slice::from_ref(&delete), None),
                live.apply(std::slice::from_ref(&upsert), None)
            );
            (a, b)
        };
        a.unwrap();
        b.unwrap();
    }
    let things = client.database("race_db").collection::<Document>("things");
    let survivors: Vec<Document> = things.find(doc! {}).await.unwrap().try_collect().await.unwrap();
    let tombstones =
        client.database("race_db").collection::<Document>("_ficus_tombstones").count_documents(doc! {}).await.unwrap();
    announce(&format!(
        "fault {name}: written {} ({KEYS} upserts racing {KEYS} newer deletes), delivered {}, applied {}, lost {}, duplicated-absorbed 0 ({tombstones} tombstones)",
        2 * KEYS,
        2 * KEYS,
        KEYS - survivors.len(),
        survivors.len()
    ));
    assert!(
        survivors.is_empty(),
        "{} of {KEYS} documents survived their newer delete (tombstone at the delete's version, document back at the \
         older one), e.g. {:?}",
        survivors.len(),
        survivors.iter().take(3).map(|d| d.to_string()).collect::<Vec<_>>()
    );
}
