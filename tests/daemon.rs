//! Operating ficus as a daemon: metrics and probes, SIGTERM, standby tailers, `ficus status`.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bson::{Document, doc};
use common::{World, checkpoint, eventually, free_port, http_get as get, read_all};
use ficus::event::Op;
use ficus::testkit::workload::Workload;
use rdkafka::consumer::Consumer;

/// Sum of a metric's samples whose labels contain `filter` (Prometheus text format).
fn metric(body: &str, name: &str, filter: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn count(client: &mongodb::Client, db: &str, coll: &str, filter: Document) -> u64 {
    client.database(db).collection::<Document>(coll).count_documents(filter).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_move_probes_answer_and_lag_returns_to_zero() {
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut f = world.spawn_ficus(&["run", "--metrics-addr", &addr, "--service", "products_db"], &[]);
    eventually("ready", Duration::from_secs(60), || async {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && get(port, "/readyz").0 == 200
    })
    .await;
    assert_eq!(get(port, "/healthz").0, 200);

    let products = client.database("linechatbot").collection::<Document>("products");
    let mut w = Workload::new(4);
    for i in 0..50 {
        products.insert_one(w.product(i)).await.unwrap();
    }
    eventually("applied", Duration::from_secs(60), || async {
        count(&client, "products_db", "products", doc! {}).await == 50
    })
    .await;
    // Counters move just after the writes they count land: give them a moment.
    eventually("counters moved", Duration::from_secs(30), || async {
        let body = get(port, "/metrics").1;
        metric(&body, "ficus_events_published_total", "linechatbot.products") >= 50.0
            && metric(&body, "ficus_tail_changes_read_total", "products") >= 50.0
            && metric(&body, "ficus_events_applied_total", "products_db") >= 50.0
            && metric(&body, "ficus_events_archived_total", "") >= 50.0
            && metric(&body, "ficus_end_to_end_latency_seconds_count", "products_db") >= 50.0
            && metric(&body, "ficus_consume_apply_seconds_count", "products_db") >= 1.0
            && body.contains("ficus_role_ready{role=\"tail\"} 1")
    })
    .await;

    // Once quiet, the stream and the consumers are caught up.
    eventually("lag back to 0", Duration::from_secs(60), || async {
        let body = get(port, "/metrics").1;
        metric(&body, "ficus_tail_lag_seconds", "") == 0.0
            && body.contains("ficus_consumer_lag{group=\"ficus.products_db\"")
            && metric(&body, "ficus_consumer_lag", "ficus.products_db") == 0.0
            && metric(&body, "ficus_tail_checkpoint_age_seconds", "") < 30.0
    })
    .await;
    assert!(f.terminate().success(), "{}", f.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_heavy_stream_exits_0_and_a_restart_loses_nothing() {
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    let products = client.database("linechatbot").collection::<Document>("products");
    let mut w = Workload::new(8);
    let docs: Vec<Document> = (0..100).map(|i| w.product(i)).collect();
    products.insert_many(docs).await.unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let args = ["run", "--service", "products_db", "--batch-max", "50", "--metrics-addr", &addr];
    let mut f = world.spawn_ficus(&args, &[]);
    eventually("snapshot applied", Duration::from_secs(60), || async {
        count(&client, "products_db", "products", doc! {}).await == 100
    })
    .await;

    let writer = {
        let products = products.clone();
        tokio::spawn(async move {
            for i in 0..2000u64 {
                products
                    .update_one(doc! { "sku": Workload::sku(i % 100) }, doc! { "$inc": { "views": 1 } })
                    .await
                    .unwrap();
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = f.terminate();
    assert!(status.success(), "SIGTERM must exit 0: {status:?}\n{}", f.logs());
    writer.await.unwrap();

    // What the stopped consumer has not applied yet, per its committed offsets.
    let mut base = rdkafka::ClientConfig::new();
    base.set("bootstrap.servers", world.kafka.brokers());
    let consumer: rdkafka::consumer::BaseConsumer = base.clone().set("group.id", "probe").create().unwrap();
    let topic = ["linechatbot.products".to_string()];
    let kafka = world.kafka.config();
    let pending = ficus::status::group_lag(&kafka, "ficus.products_db", &topic).unwrap().lag;
    let end = |c: &rdkafka::consumer::BaseConsumer| -> i64 {
        (0..3).map(|p| c.fetch_watermarks("linechatbot.products", p, Duration::from_secs(10)).unwrap().1).sum()
    };
    let end_at_stop = end(&consumer);

    let mut f = world.spawn_ficus(&args, &[]);
    eventually("caught up after the restart", Duration::from_secs(120), || async {
        let sum: i64 = ficus::status::group_lag(&kafka, "ficus.products_db", &topic).map(|g| g.lag).unwrap_or(1);
        sum == 0 && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let applied = metric(&get(port, "/metrics").1, "ficus_events_applied_total", "products_db") as i64;
    let published_since = end(&consumer) - end_at_stop;
    assert!(f.terminate().success(), "{}", f.logs());
    // The restart applied what was pending at the stop plus what the tail published since, and
    // re-applied at most one batch (50) of what the stopped consumer had already applied.
    let due = pending + published_since;
    assert!(applied >= due && applied <= due + 50, "applied {applied} after the restart; {due} were due");
    let out = world.ficus(&["verify", "--checks", "counts,contents", "--service", "products_db"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_tailer_takes_over_within_the_lease_time_and_nothing_is_lost() {
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    let config = world.dir.path().join("ficus.toml");
    std::fs::write(&config, "[tail]\nlease_ttl_ms = 3000\n").unwrap();
    let cfg = config.to_str().unwrap();
    let mut a = world.spawn_ficus(&["run", "--roles", "tail", "--config", cfg], &[]);
    eventually("A streaming", Duration::from_secs(60), || async {
        checkpoint(&client, "linechatbot").await.is_some_and(|c| c.get_document("stream").is_ok())
    })
    .await;
    let mut b = world.spawn_ficus(&["run", "--roles", "tail", "--config", cfg], &[]);
    eventually("B on standby", Duration::from_secs(30), || async { b.logs().contains("standby") }).await;

    let customers = client.database("linechatbot").collection::<Document>("customers");
    let writer = tokio::spawn(async move {
        let mut w = Workload::new(9);
        for i in 0..300u64 {
            customers.insert_one(w.customer(i)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    a.sigkill();
    let killed = std::time::Instant::now();
    eventually("B takes over", Duration::from_secs(30), || async { b.logs().contains("lease acquired") }).await;
    let took = killed.elapsed();
    // Within the lease time plus one standby poll (a third of it), with room for a loaded machine.
    assert!(took < Duration::from_millis(3 * 3000), "takeover took {took:?} with a 3 s lease");
    writer.await.unwrap();

    let records = read_all(&world.kafka.brokers(), &["linechatbot.customers"]);
    let keys: std::collections::HashSet<&str> =
        records.iter().filter(|r| r.is_event() && r.event().data.op == Op::Insert).map(|r| r.key.as_str()).collect();
    for i in 0..300 {
        assert!(keys.contains(Workload::user_id(i).as_str()), "customer {i} lost in the takeover");
    }
    // Duplicates from the overlap: one id, one aggregate.
    let mut by_id: HashMap<&str, &str> = HashMap::new();
    for r in &records {
        if let Some(prev) = by_id.insert(r.message.id(), &r.key) {
            assert_eq!(prev, r.key);
        }
    }
    assert!(b.terminate().success(), "{}", b.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_a_stopped_consumer_lag_growing() {
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    let mut tail = world.spawn_ficus(&["run", "--roles", "tail"], &[]);
    let mut consume = world.spawn_ficus(&["run", "--roles", "consume", "--service", "customers_db"], &[]);
    let customers = client.database("linechatbot").collection::<Document>("customers");
    let mut w = Workload::new(10);
    customers.insert_one(w.customer(0)).await.unwrap();
    eventually("applied", Duration::from_secs(60), || async {
        count(&client, "customers_db", "customers", doc! {}).await == 1
    })
    .await;
    assert!(consume.terminate().success());

    let lag_of = |out: &str| -> i64 {
        let line = out
            .lines()
            .find(|l| l.starts_with("consume customers_db"))
            .unwrap_or_else(|| panic!("no consumer row:\n{out}"));
        line.split_whitespace()
            .skip_while(|w| !w.ends_with("committed"))
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no lag in {line}"))
    };
    let status = || {
        let out = world.ficus(&["status"], &[]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for i in 1..=5 {
        customers.insert_one(w.customer(i)).await.unwrap();
    }
    let mut first = String::new();
    eventually("lag shows", Duration::from_secs(30), || {
        first = status();
        let lag = lag_of(&first);
        async move { lag >= 5 }
    })
    .await;
    assert!(first.contains("STOPPED"), "{first}");
    assert!(first.lines().any(|l| l.starts_with("tail linechatbot") && l.contains("streaming")), "{first}");
    for i in 6..=15 {
        customers.insert_one(w.customer(i)).await.unwrap();
    }
    let before = lag_of(&first);
    eventually("lag grows", Duration::from_secs(30), || {
        let now = lag_of(&status());
        async move { now >= before + 10 }
    })
    .await;
    assert!(tail.terminate().success());
}

/// A consumer group that holds no partitions while messages wait (here, a foreign member that
/// took the only partition and consumes nothing) makes the role not ready, naming it, and
/// `ficus status` says so; once the partition comes to ficus, it consumes and is ready again.
#[tokio::test(flavor = "multi_thread")]
async fn readyz_is_503_while_a_group_is_stalled_with_lag_and_200_once_it_consumes() {
    let world = World::start();
    let defs = world.dir.path().join("defs");
    std::fs::create_dir_all(defs.join("topics")).unwrap();
    std::fs::create_dir_all(defs.join("transforms/stall_db")).unwrap();
    std::fs::write(
        defs.join("topics/logs.toml"),
        "collection = \"logs\"\ntopic = \"stall.logs\"\naggregate = \"log\"\nkey = \"_id\"\npartitions = 1\nreplication_factor = 1\n",
    )
    .unwrap();
    std::fs::write(
        defs.join("transforms/stall_db/entries.toml"),
        "topic = \"stall.logs\"\nevents = [\"log.snapshot\", \"log.created\", \"log.updated\", \"log.deleted\"]\ncollection = \"entries\"\nkey = \"_id\"\n\n[fields]\nkind = \"kind\"\n",
    )
    .unwrap();
    let config = world.dir.path().join("stall.toml");
    std::fs::write(
        &config,
        "[kafka.consumer]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"1000\"\n",
    )
    .unwrap();
    let (topics, transforms) = (defs.join("topics"), defs.join("transforms"));
    let env = [
        ("FICUS_TOPICS_DIR", topics.to_str().unwrap()),
        ("FICUS_TRANSFORMS_DIR", transforms.to_str().unwrap()),
        ("FICUS_CONFIG", config.to_str().unwrap()),
    ];
    let out = world.ficus(&["topics", "apply"], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A member of ficus's group that takes the only partition and never commits.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let squatter = {
        let (brokers, stop) = (world.kafka.brokers(), stop.clone());
        std::thread::spawn(move || {
            let c: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", "ficus.stall_db")
                .set("enable.auto.commit", "false")
                .set("session.timeout.ms", "6000")
                .set("partition.assignment.strategy", "cooperative-sticky")
                .create()
                .unwrap();
            c.subscribe(&["stall.logs"]).unwrap();
            let mut told = false;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = c.poll(Duration::from_millis(200));
                if !told && c.assignment().map(|a| a.count()).unwrap_or(0) == 1 {
                    told = true;
                    held_tx.send(()).unwrap();
                }
            }
            // Dropping the consumer leaves the group: the partition goes to ficus.
        })
    };
    held_rx.recv_timeout(Duration::from_secs(60)).expect("the squatter never got the partition");

    let client = world.mongo.client().await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut f = world.spawn_ficus(&["run", "--roles", "tail,consume", "--metrics-addr", &addr], &env);
    let logs = client.database("linechatbot").collection::<Document>("logs");
    for i in 0..5 {
        logs.insert_one(doc! { "kind": "audit", "n": i }).await.unwrap();
    }
    let mut body = String::new();
    eventually("readyz 503 naming the stalled group", Duration::from_secs(120), || {
        let (code, text) = if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            get(port, "/readyz")
        } else {
            (0, String::new())
        };
        // (It may first say the member is not admitted: Tansu keeps such a group rebalancing.)
        let named = code == 503 && text.contains("no partitions assigned");
        body = text;
        async move { named }
    })
    .await;
    // Five documents and the snapshot's end-of-copy marker wait on the only partition.
    assert!(body.contains("consume:stall_db: no partitions assigned, lag 6"), "{body}\n{}", f.logs());
    assert!(!body.contains("tail"), "only the stalled role is named: {body}");
    let status = world.ficus(&["status"], &env);
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    let row = status.lines().find(|l| l.starts_with("consume stall_db")).unwrap_or_else(|| panic!("{status}"));
    assert!(row.contains("no partitions assigned, lag 6"), "{status}");
    assert_eq!(count(&client, "stall_db", "entries", doc! {}).await, 0);

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    squatter.join().unwrap();
    eventually("consumed and ready again", Duration::from_secs(90), || async {
        count(&client, "stall_db", "entries", doc! {}).await == 5 && get(port, "/readyz").0 == 200
    })
    .await;
    assert!(f.terminate().success(), "{}", f.logs());
}

/// The daemon is a library call: started in-process with a future as its shutdown, it consumes,
/// and returns cleanly once the future completes (what `ficus run` does on SIGTERM).
#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_runs_in_process_until_its_shutdown_future_completes() {
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    let products = client.database("linechatbot").collection::<Document>("products");
    let mut w = Workload::new(11);
    for i in 0..20 {
        products.insert_one(w.product(i)).await.unwrap();
    }
    let root = common::repo_root();
    let mut env = world.env();
    env.insert("FICUS_TOPICS_DIR".into(), root.join("topics").to_string_lossy().into_owned());
    env.insert("FICUS_TRANSFORMS_DIR".into(), root.join("transforms").to_string_lossy().into_owned());
    let lookup = |k: &str| env.get(k).cloned();
    let (config, report) = ficus::config::Config::load(None, &lookup);
    assert!(report.is_empty(), "{report}");
    let kafka = config.kafka.clone();
    let topics = ficus::config::topics::load(&config.topics_dir).unwrap();
    let services = ficus::transform::load_all(&config.transforms_dir, &topics).unwrap();
    let definitions = ficus::daemon::Definitions {
        topics: std::sync::Arc::new(topics),
        services: services.into_iter().map(std::sync::Arc::new).collect(),
    };
    let options = ficus::daemon::Options {
        roles: vec![ficus::daemon::Role::Tail, ficus::daemon::Role::Consume],
        services: vec!["products_db".into()],
        ..Default::default()
    };
    let running = options.running.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(ficus::daemon::run(definitions, config, options, async {
        let _ = stopped.await;
    }));
    eventually("applied in-process", Duration::from_secs(120), || async {
        count(&client, "products_db", "products", doc! {}).await == 20
    })
    .await;
    assert_eq!(running.describe(), "consume:products_db, tail");
    stop.send(()).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(60), daemon).await.expect("the daemon stopped");
    ended.unwrap().expect("a clean stop");
    assert_eq!(running.describe(), "nothing", "every role ended");
    // Its offsets were committed on the way out: the group has no lag.
    let lag = ficus::status::group_lag(&kafka, "ficus.products_db", &["linechatbot.products".to_string()]).unwrap();
    assert_eq!(lag.lag, 0, "{lag:?}");
}

/// An unknown service is bad input, before anything starts.
#[tokio::test]
async fn the_daemon_refuses_an_unknown_service() {
    let lookup = |_: &str| None;
    let (config, _) = ficus::config::Config::load(None, &lookup);
    let definitions = ficus::daemon::Definitions { topics: Default::default(), services: vec![] };
    let options = ficus::daemon::Options { services: vec!["nope_db".into()], ..Default::default() };
    let err = ficus::daemon::run(definitions, config, options, std::future::pending()).await.unwrap_err();
    assert!(err.is_misconfiguration(), "{err}");
    assert!(err.to_string().contains("no service `nope_db`"), "{err}");
}
