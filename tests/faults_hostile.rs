//! Hostile input, while ficus runs: every BSON type, deep nesting, dotted and `$` keys, huge
//! arrays, keys that look like Extended JSON, a document near 16 MB, garbage from another
//! producer on ficus's topics, events no transform matches, and broken configuration and
//! definitions. What arrives must arrive intact, and what cannot must go to the dead letters
//! loudly or stop ficus with a clear error: never silent loss. One line per scenario, as in the
//! other fault families (README, "Faults, and what the tests prove").

mod common;

use std::time::{Duration, Instant};

use bson::{Bson, Document, doc};
use common::scenario::audit::{at, read_raw_async};
use common::scenario::{PRODUCTS, Setup, announce, plain, stop_cleanly, tail_of, text};
use ficus::event::CanonicalEvent;
use ficus::testkit::workload::Workload;

/// A product carrying hostile values where the products transform copies them as they are
/// (`specs` → `specifications`, `tags` → `seo.tags`).
fn hostile_product(sku: &str, specs: Document, tags: Bson) -> Document {
    doc! { "_id": bson::oid::ObjectId::new(), "sku": sku, "name_en": format!("hostile {sku}"), "views": 1_i64, "specs": specs, "tags": tags }
}

/// Every BSON type the server takes, including the deprecated ones and the awkward values
/// (NaN, -0.0, infinities, dates before 1970 and in year 9999, NUL inside a string).
fn every_bson_type() -> Document {
    use bson::spec::BinarySubtype;
    let regex = bson::Regex {
        pattern: "^a.*b$".to_string().try_into().unwrap(),
        options: "imsx".to_string().try_into().unwrap(),
    };
    doc! {
        "double": 1.5, "nan": f64::NAN, "neg_zero": -0.0_f64, "inf": f64::INFINITY, "neg_inf": f64::NEG_INFINITY,
        "string": "สวัสดี 👋 nul\u{0}inside \"quoted\" \\ back",
        "document": { "a": 1_i32, "empty": {} },
        "array": [1_i32, "two", [3_i32, [4_i64, []]], {}, Bson::Null],
        "binary": bson::Binary { subtype: BinarySubtype::Generic, bytes: vec![0, 1, 2, 255] },
        "uuid": bson::Binary { subtype: BinarySubtype::Uuid, bytes: (0u8..16).collect() },
        "user_binary": bson::Binary { subtype: BinarySubtype::UserDefined(0x80), bytes: vec![9; 5] },
        "object_id": bson::oid::ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").unwrap(),
        "bool": true,
        "date_1938": bson::DateTime::from_millis(-1_000_000_000_000),
        "date_9999": bson::DateTime::from_millis(253_402_300_799_999),
        "null": Bson::Null,
        "regex": Bson::RegularExpression(regex),
        "javascript": Bson::JavaScriptCode("function () { return 1; }".into()),
        "javascript_scope": Bson::JavaScriptCodeWithScope(bson::JavaScriptCodeWithScope { code: "x + 1".into(), scope: doc! { "x": 1_i32 } }),
        "int32": i32::MIN, "int64": i64::MAX,
        "timestamp": Bson::Timestamp(bson::Timestamp { time: 1_700_000_000, increment: 7 }),
        "decimal": "1234567890.123456789012345678901234".parse::<bson::Decimal128>().unwrap(),
        "decimal_neg_zero": "-0.00".parse::<bson::Decimal128>().unwrap(),
        "decimal_nan": "NaN".parse::<bson::Decimal128>().unwrap(),
        "decimal_exp": "1E+6144".parse::<bson::Decimal128>().unwrap(),
        "min_key": Bson::MinKey, "max_key": Bson::MaxKey,
        "symbol": Bson::Symbol("sym".into()),
        "undefined": Bson::Undefined,
    }
}

/// `levels` documents nested in one another.
fn nested(levels: usize) -> Document {
    let mut d = doc! { "bottom": levels as i32 };
    for i in (0..levels).rev() {
        d = doc! { format!("l{i}"): d };
    }
    d
}

fn raw(b: &Bson) -> Vec<u8> {
    bson::serialize_to_vec(&doc! { "v": b.clone() }).unwrap()
}

/// Dead letters of a topic, as JSON.
async fn dead_letters(brokers: &str, topic: &str) -> Vec<serde_json::Value> {
    read_raw_async(brokers, &[&format!("{topic}.dlq")])
        .await
        .into_iter()
        .map(|r| serde_json::from_slice(r.payload.as_deref().unwrap_or_default()).unwrap())
        .collect()
}

/// Hostile documents arrive in the service database bit for bit (compared as raw BSON, so
/// NaN, -0.0 and every type are checked exactly), or the failure is loud.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_documents_arrive_intact() {
    let name = "hostile-documents";
    let s = Setup::new(name).start().await;
    let client = &s.source;
    let mut f = s.spawn(&["run", "--service", "products_db"]);
    s.wait_streaming().await;

    let many: Vec<Bson> = (0..20_000).map(Bson::Int32).collect();
    let nested_arrays = Bson::Array(vec![Bson::Array(vec![Bson::Array(vec![Bson::Array(vec![]); 3]); 3]); 50]);
    let cases: Vec<(&str, Document, Bson)> = vec![
        ("HOSTILE-types", every_bson_type(), Bson::Array(vec![])),
        ("HOSTILE-deep", nested(90), Bson::Array(vec![nested_arrays])),
        (
            "HOSTILE-keys",
            doc! { "a.b": 1_i32, "$dollar": 2_i32, "in": { "$deeper": { "x.y.z": "dots" } }, "": "empty key", "ก.ข": "thai dots" },
            Bson::Array(vec![]),
        ),
        ("HOSTILE-huge-array", doc! {}, Bson::Array(many)),
    ];
    let products = client.database("linechatbot").collection::<Document>("products");
    let mut written = Vec::new();
    let mut refused = Vec::new();
    for (sku, specs, tags) in &cases {
        match products.insert_one(hostile_product(sku, specs.clone(), tags.clone())).await {
            Ok(_) => written.push(*sku),
            // The monolith itself refuses some shapes; nothing for ficus to carry then.
            Err(e) => refused.push(format!("{sku}: {e}")),
        }
    }
    // An ordinary product behind them shows the pipeline is still moving.
    products.insert_one(hostile_product("HOSTILE-after", doc! { "ok": true }, Bson::Array(vec![]))).await.unwrap();
    let target = client.database("products_db").collection::<Document>("products");
    s.wait("the product behind the hostile ones", Duration::from_secs(120), || async {
        target.count_documents(doc! { "_id": "HOSTILE-after" }).await.unwrap() == 1
    })
    .await;

    let dead = dead_letters(&s.world.kafka.brokers(), PRODUCTS).await;
    let mut problems = Vec::new();
    let mut applied = 0;
    let mut dead_lettered = 0;
    for (sku, specs, tags) in cases.iter().filter(|c| written.contains(&c.0)) {
        let in_dlq = dead.iter().any(|d| d["event"]["subject"] == *sku);
        match target.find_one(doc! { "_id": *sku }).await.unwrap() {
            Some(t) => {
                let got_specs = t.get("specifications").cloned().unwrap_or(Bson::Document(doc! {}));
                let got_tags = at(&t, "seo.tags").cloned().unwrap_or(Bson::Array(vec![]));
                let want_specs = Bson::Document(specs.clone());
                if raw(&got_specs) != raw(&want_specs) {
                    let (w, g) =
                        (want_specs.as_document().unwrap(), got_specs.as_document().cloned().unwrap_or_default());
                    let changed: Vec<String> = w
                        .iter()
                        .filter(|(k, v)| g.get(k.as_str()).is_none_or(|x| raw(x) != raw(v)))
                        .map(|(k, v)| format!("{k}: source {v:?}, target {:?}", g.get(k.as_str())))
                        .collect();
                    problems.push(format!("{sku}: specifications differ from the source: {changed:?}"));
                } else if raw(&got_tags) != raw(tags) {
                    problems.push(format!("{sku}: seo.tags differ from the source's tags"));
                } else {
                    applied += 1;
                }
            }
            None if in_dlq => dead_lettered += 1,
            None => problems.push(format!("{sku}: neither in products_db nor dead-lettered (silently lost)")),
        }
    }
    let verify = s.run(&["verify", "--checks", "counts,contents", "--service", "products_db", "--settle", "1"]);
    if !verify.status.success() {
        problems.push(format!("ficus verify --service products_db:\n{}", tail_of(&text(&verify), 30)));
    }
    let alive = f.wait(Duration::ZERO).is_none();
    if !alive {
        problems.push(format!("ficus died:\n{}", tail_of(&f.logs(), 30)));
    }
    let lost = written.len() - applied - dead_lettered;
    announce(&format!(
        "fault {name}: written {}, delivered {}, applied {applied}, lost {lost}, duplicated-absorbed 0 (dead-lettered {dead_lettered}; refused by the monolith: {refused:?})",
        written.len(),
        written.len()
    ));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    if alive {
        stop_cleanly(&mut f, "ficus");
    }
}

/// Sub-documents whose keys look like Extended JSON (`$date`, `$numberInt`, `$oid`): legal in
/// MongoDB (5.0+ allows `$`-prefixed field names), and easy to mistake for typed values in a
/// JSON envelope. Each must arrive as the sub-document it is, or go to the DLQ loudly, and the
/// daemon must keep going. Inserted one at a time (the one that stops the tail last).
#[tokio::test(flavor = "multi_thread")]
async fn extended_json_lookalike_keys_are_not_mistaken_for_types() {
    let name = "hostile-extjson-keys";
    let s = Setup::new(name).start().await;
    let client = &s.source;
    let mut f = s.spawn(&["run", "--service", "products_db"]);
    s.wait_streaming().await;
    let cases = [
        ("LOOKALIKE-date", doc! { "made": { "$date": { "$numberLong": "0" } } }),
        ("LOOKALIKE-int", doc! { "count": { "$numberInt": "5" } }),
        ("LOOKALIKE-regex", doc! { "rule": { "$regularExpression": { "pattern": "a", "options": "" } } }),
        ("LOOKALIKE-oid", doc! { "ref": { "$oid": "not an object id" } }),
    ];
    let products = client.database("linechatbot").collection::<Document>("products");
    // Read raw: the driver's serde reader would itself take `{"$oid": ...}` for an ObjectId.
    let target = client.database("products_db").collection::<bson::RawDocumentBuf>("products");
    let mut problems = Vec::new();
    let mut exit: Option<std::process::ExitStatus> = None;
    let (mut written, mut applied, mut dead_lettered) = (0, 0, 0);
    for (sku, specs) in &cases {
        if products.insert_one(hostile_product(sku, specs.clone(), Bson::Array(vec![]))).await.is_err() {
            continue; // the monolith refused it: nothing to carry
        }
        written += 1;
        let deadline = Instant::now() + Duration::from_secs(60);
        let outcome = loop {
            if let Some(t) = target.find_one(doc! { "_id": *sku }).await.unwrap() {
                break Some(Document::try_from(t).unwrap());
            }
            let dead = dead_letters(&s.world.kafka.brokers(), PRODUCTS).await;
            if dead.iter().any(|d| d["event"]["subject"] == *sku) {
                dead_lettered += 1;
                break None;
            }
            if exit.is_none() {
                exit = f.wait(Duration::ZERO);
            }
            if exit.is_some() || Instant::now() > deadline {
                let error = plain(&f.logs()).lines().filter(|l| l.contains("ERROR")).take(1).collect::<String>();
                problems.push(format!(
                    "{sku} ({specs}): neither applied nor dead-lettered; ficus {}: {error}",
                    if exit.is_some() { "stopped" } else { "is stuck" }
                ));
                break None;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        if let Some(t) = outcome {
            let got = t.get_document("specifications").cloned().unwrap_or_default();
            if raw(&Bson::Document(got.clone())) == raw(&Bson::Document(specs.clone())) {
                applied += 1;
            } else {
                problems
                    .push(format!("{sku}: the source has {specs}, the service database got {got} (silently changed)"));
            }
        }
        if exit.is_some() {
            break;
        }
    }
    if exit.is_none() {
        // What was applied also verifies, and the archive holds every event, escaped names and all.
        let out = s.run(&["verify", "--checks", "counts,contents", "--service", "products_db", "--settle", "1"]);
        if !out.status.success() {
            problems.push(format!("ficus verify --service products_db:\n{}", tail_of(&text(&out), 30)));
        }
        let events = client.database("ficus").collection::<Document>("events");
        let skus: Vec<&str> = cases.iter().map(|(sku, _)| *sku).collect();
        let filter = doc! { "key": { "$in": &skus } };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut archived = 0;
        while Instant::now() < deadline {
            archived = events.count_documents(filter.clone()).await.unwrap();
            if archived >= written as u64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        if archived != written as u64 {
            problems.push(format!("{archived} of {written} events archived"));
        }
        // And a rebuild from the archive gives the same database.
        for cmd in [
            &["replay", "--service", "products_db"][..],
            &["verify", "--checks", "counts,contents", "--service", "products_db", "--settle", "1"],
        ] {
            let out = s.run(cmd);
            if !out.status.success() {
                problems.push(format!("ficus {}:\n{}", cmd.join(" "), tail_of(&text(&out), 30)));
            }
        }
        exit = f.wait(Duration::ZERO);
    }
    let alive = exit.is_none();
    announce(&format!(
        "fault {name}: written {written}, delivered -, applied {applied}, lost {}, duplicated-absorbed 0 (dead-lettered {dead_lettered}; ficus {})",
        written - applied - dead_lettered,
        if alive { "running" } else { "stopped" }
    ));
    assert!(problems.is_empty(), "{}\n{}", problems.join("\n"), s.problems());
    if alive {
        stop_cleanly(&mut f, "ficus");
    }
}

/// A document near MongoDB's 16 MB limit does not fit Kafka's default message size (1 MB).
/// Stopping on it would stop the tail for good (a restart meets the same change: a crash loop),
/// and skipping it quietly would lose it. So: an ERROR naming the topic, the event, the size and
/// the remedy; a dead letter on `<topic>.dlq` with the event's envelope (no document); the tail
/// carries on, the events before and after are delivered, and `ficus verify` reports the drift.
#[tokio::test(flavor = "multi_thread")]
async fn a_document_near_16_mb_is_dead_lettered_loudly_and_the_tail_goes_on() {
    let name = "hostile-16mb";
    let s = Setup::new(name).start().await;
    let client = &s.source;
    let mut f = s.spawn(&["run", "--service", "products_db"]);
    s.wait_streaming().await;
    let products = client.database("linechatbot").collection::<Document>("products");
    products.insert_one(hostile_product("BIG-before", doc! {}, Bson::Array(vec![]))).await.unwrap();
    let mut big = hostile_product("BIG-16mb", doc! {}, Bson::Array(vec![]));
    big.insert("desc_en", "x".repeat(16 * 1024 * 1024 - 4096));
    products.insert_one(big).await.expect("the monolith takes a document just under 16 MB");
    products.insert_one(hostile_product("BIG-after", doc! {}, Bson::Array(vec![]))).await.unwrap();

    s.wait("the dead letter and the event after it", Duration::from_secs(120), || {
        let brokers = s.world.kafka.brokers();
        async move {
            let after = read_raw_async(&brokers, &[PRODUCTS])
                .await
                .iter()
                .filter_map(|r| r.payload.as_deref().and_then(|p| CanonicalEvent::decode(p).ok()))
                .any(|e| e.subject == "BIG-after");
            after && !dead_letters(&brokers, PRODUCTS).await.is_empty()
        }
    })
    .await;
    let dead = dead_letters(&s.world.kafka.brokers(), PRODUCTS).await;
    let logs = plain(&f.logs());
    let keys: Vec<String> = read_raw_async(&s.world.kafka.brokers(), &[PRODUCTS])
        .await
        .iter()
        // Events only: snapshot markers are control messages, which do not decode as events.
        .filter_map(|r| r.payload.as_deref().and_then(|p| CanonicalEvent::decode(p).ok()))
        .map(|e| e.subject)
        .collect();
    let alive = f.wait(Duration::ZERO).is_none();
    let letter = dead.iter().find(|d| d["event"]["subject"] == "BIG-16mb").cloned().unwrap_or_default();
    announce(&format!(
        "fault {name}: written 3, delivered {} (+1 dead-lettered), applied -, lost 0, duplicated-absorbed 0 (ficus {}; the dead letter: {})",
        keys.len(),
        if alive { "running" } else { "stopped" },
        letter["error"].as_str().unwrap_or("(none)").chars().take(200).collect::<String>()
    ));
    assert!(alive, "the tail must carry on past an oversized event:\n{}", tail_of(&logs, 20));
    assert!(keys.iter().any(|k| k == "BIG-before") && keys.iter().any(|k| k == "BIG-after"), "{keys:?}");
    assert!(!keys.iter().any(|k| k == "BIG-16mb"), "the big event cannot be on the topic: {keys:?}");
    assert_eq!(letter["stage"], "publish", "{letter}");
    assert!(letter["event"]["data"]["after"].is_null(), "the dead letter keeps the envelope, not the document");
    let error = letter["error"].as_str().unwrap_or_default();
    assert!(error.contains("too large") && error.contains("message.max.bytes"), "{error}");
    let logged = logs.lines().filter(|l| l.contains("ERROR")).collect::<Vec<_>>().join("\n");
    assert!(logged.contains(PRODUCTS) && logged.contains("BIG-16mb") && logged.contains("too large"), "{logged}");
    // Not silent downstream either: the service database lacks it, and verify says so.
    let out = s.run(&["verify", "--checks", "counts,contents", "--service", "products_db", "--settle", "1"]);
    assert_eq!(out.status.code(), Some(1), "verify must report the missing document:\n{}", text(&out));
    assert!(text(&out).contains("BIG-16mb"), "{}", tail_of(&text(&out), 30));
    stop_cleanly(&mut f, "ficus");
}

/// Another producer puts garbage on a ficus topic, and events arrive that no transform
/// matches: each piece of garbage is dead-lettered with the decode error, unmatched events are
/// skipped quietly, the archive keeps only events, and the consumers carry on.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_messages_and_unmatched_events() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let name = "hostile-messages";
    let s = Setup::new(name).start().await;
    let client = &s.source;
    let mut f = s.spawn(&["run", "--service", "products_db", "--service", "metrics_db"]);
    s.wait_streaming().await;

    // A real event to disfigure.
    let products = client.database("linechatbot").collection::<Document>("products");
    products.insert_one(hostile_product("MSG-template", doc! {}, Bson::Array(vec![]))).await.unwrap();
    let template = loop {
        let records = read_raw_async(&s.world.kafka.brokers(), &[PRODUCTS]).await;
        // The product's own event, not a snapshot marker on the same topic.
        let event = records
            .iter()
            .filter_map(|r| r.payload.as_deref())
            .filter_map(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
            .find(|v| v["subject"] == "MSG-template");
        if let Some(event) = event {
            break event;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = template.clone();
        v["subject"] = "MSG-forged".into();
        f(&mut v);
        Some(serde_json::to_vec(&v).unwrap())
    };
    let garbage: Vec<(&str, Option<Vec<u8>>)> = vec![
        ("not json", Some(b"{not json".to_vec())),
        ("empty", Some(Vec::new())),
        ("no payload", None),
        ("binary", Some(vec![0xff, 0xfe, 0x00, 0x81])),
        ("a JSON array", Some(b"[1,2,3]".to_vec())),
        ("a JSON number", Some(b"42".to_vec())),
        ("fields missing", Some(br#"{"specversion":"1.0"}"#.to_vec())),
        ("bad sequence", with(&|v| v["sequence"] = "abc".into())),
        ("CloudEvents 2.0", with(&|v| v["specversion"] = "2.0".into())),
        ("bad Extended JSON", with(&|v| v["data"]["after"]["views"] = serde_json::json!({ "$numberInt": "many" }))),
        ("900 KB of noise", Some(vec![b'#'; 900 * 1024])),
    ];
    let unmatched = [("an event type nobody reads", with(&|v| v["type"] = "product.exploded".into()))];
    let producer: FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", s.world.kafka.brokers()).create().unwrap();
    for (what, payload) in garbage.iter().chain(unmatched.iter()) {
        let key = format!("MSG-{}", what.replace(' ', "-"));
        let mut record = FutureRecord::<String, Vec<u8>>::to(PRODUCTS).key(&key);
        if let Some(p) = payload {
            record = record.payload(p);
        }
        producer.send(record, Duration::from_secs(30)).await.unwrap();
    }
    // Logs no transform routes anywhere (kind "debug"), next to one that is routed.
    let logs = client.database("linechatbot").collection::<Document>("logs");
    let mut w = Workload::new(5);
    for i in 0..6u64 {
        let mut l = w.log(i * 3 + 1); // audit
        if i > 0 {
            l.insert("kind", "debug");
        }
        logs.insert_one(l).await.unwrap();
    }
    products.insert_one(hostile_product("MSG-after", doc! {}, Bson::Array(vec![]))).await.unwrap();
    let target = client.database("products_db").collection::<Document>("products");
    s.wait("the product behind the garbage", Duration::from_secs(120), || async {
        target.count_documents(doc! { "_id": "MSG-after" }).await.unwrap() == 1
    })
    .await;

    let mut problems = Vec::new();
    let dead = {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let d = dead_letters(&s.world.kafka.brokers(), PRODUCTS).await;
            if d.len() >= garbage.len() || Instant::now() > deadline {
                break d;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    for (what, _) in &garbage {
        let key = format!("MSG-{}", what.replace(' ', "-"));
        let _ = key;
        let found = dead.iter().filter(|d| d["service"] == "products_db").any(|d| {
            d["stage"] == "decode"
                && d["error"].as_str().is_some_and(|e| !e.is_empty())
                && d["topic"] == PRODUCTS
                && d["offset"].is_number()
        });
        if !found {
            problems.push(format!("{what}: no dead letter"));
        }
    }
    if dead.len() != garbage.len() {
        problems.push(format!("{} dead letters for {} pieces of garbage: {dead:#?}", dead.len(), garbage.len()));
    }
    if target.count_documents(doc! { "_id": "MSG-forged" }).await.unwrap() != 0 {
        problems.push("a forged event was applied".into());
    }
    let logs_dead = dead_letters(&s.world.kafka.brokers(), "linechatbot.logs").await;
    if !logs_dead.is_empty() {
        problems.push(format!("logs no transform matches were dead-lettered: {logs_dead:?}"));
    }
    for service in ["products_db", "metrics_db"] {
        let out = s.run(&["verify", "--checks", "counts,contents", "--service", service, "--settle", "1"]);
        if !out.status.success() {
            problems.push(format!("verify {service}:\n{}", tail_of(&text(&out), 20)));
        }
    }
    if f.wait(Duration::ZERO).is_some() {
        problems.push(format!("ficus died:\n{}", tail_of(&f.logs(), 30)));
    }
    let sent = garbage.len() + unmatched.len();
    announce(&format!(
        "fault {name}: written {sent} foreign records + 6 logs (5 routed nowhere), delivered {sent}, applied 1 (the audit log), lost 0, duplicated-absorbed 0 (dead-lettered {} of {} undecodable)",
        dead.len(),
        garbage.len()
    ));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    stop_cleanly(&mut f, "ficus");
}

/// Broken configuration and definitions: every case exits 2, fast, naming the file and the
/// field, and never prints a password; `ficus run` behaves like `ficus validate`.
#[test]
fn broken_configuration_and_definitions_exit_2_naming_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let write = |name: &str, text: &str| {
        let p = d.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let topics = common::repo_root().join("topics");
    let bad_topics = d.join("bad-topics");
    std::fs::create_dir_all(&bad_topics).unwrap();
    for e in std::fs::read_dir(&topics).unwrap().flatten() {
        std::fs::copy(e.path(), bad_topics.join(e.file_name())).unwrap();
    }
    std::fs::write(
        bad_topics.join("products.toml"),
        std::fs::read_to_string(topics.join("products.toml"))
            .unwrap()
            .replace("partitions = 3", "partitions = \"three\""),
    )
    .unwrap();
    let bad_transforms = d.join("bad-transforms");
    write(
        "bad-transforms/crm_db/contacts.toml",
        "topic = \"linechatbot.customers\"\nevents = [\"customer.created\"]\ncollection = \"contacts\"\nkey = \"lineUserId\"\n\n[fields]\nlineUserId = \"user_id\"\nscore = \"stats.score | no_such_function\"\n",
    );
    let ok_config = write("ok.toml", "[tail]\nlease_ttl_ms = 2000\n");
    // (what, config file or None, extra environment, needles the error must contain)
    type Case<'a> = (&'a str, Option<String>, Vec<(&'a str, String)>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        ("TOML syntax", Some(write("syntax.toml", "[tail\nlease_ttl_ms = 1\n")), vec![], vec!["syntax.toml"]),
        (
            "unknown key",
            Some(write("unknown.toml", "[source]\nurl = \"mongodb://x\"\n")),
            vec![],
            vec!["unknown.toml", "url"],
        ),
        (
            "wrong type",
            Some(write("type.toml", "[tail]\nlease_ttl_ms = \"soon\"\n")),
            vec![],
            vec!["type.toml", "lease_ttl_ms"],
        ),
        (
            "bad value",
            Some(write("value.toml", "[tail]\non_history_lost = \"shrug\"\n")),
            vec![],
            vec!["value.toml", "tail.on_history_lost"],
        ),
        (
            "zero",
            Some(write("zero.toml", "[tail]\nmax_in_flight = 0\n")),
            vec![],
            vec!["zero.toml", "tail.max_in_flight"],
        ),
        (
            "not a MongoDB URI, with a password",
            Some(write("uri.toml", "[source]\nuri = \"http://ficus:hunter2@db.example/\"\n")),
            vec![("FICUS_SOURCE_URI", String::new())], // empty: the file's value counts
            vec!["uri.toml", "source.uri"],
        ),
        (
            "bootstrap.servers in properties",
            Some(write("bootstrap.toml", "[kafka.properties]\n\"bootstrap.servers\" = \"x:1\"\n")),
            vec![],
            vec!["bootstrap.toml", "kafka.properties.bootstrap.servers"],
        ),
        (
            "missing config file",
            Some(d.join("nowhere.toml").to_str().unwrap().to_string()),
            vec![],
            vec!["nowhere.toml"],
        ),
        (
            "broken topic definition",
            Some(ok_config.clone()),
            vec![("FICUS_TOPICS_DIR", bad_topics.to_str().unwrap().to_string())],
            vec!["products.toml", "partitions"],
        ),
        (
            "broken transform",
            Some(ok_config.clone()),
            vec![("FICUS_TRANSFORMS_DIR", bad_transforms.to_str().unwrap().to_string())],
            vec!["contacts.toml", "score", "no_such_function"],
        ),
        (
            "bad database name from the environment",
            Some(ok_config.clone()),
            vec![
                ("FICUS_SOURCE_DB", "bad.name".to_string()),
                ("FICUS_SOURCE_URI", "mongodb://ficus:hunter2@127.0.0.1:1/".into()),
            ],
            vec!["source.db"],
        ),
    ];
    let mut problems = Vec::new();
    for (what, config, extra, needles) in &cases {
        for command in [&["validate"][..], &["run", "--roles", "tail"][..]] {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ficus"));
            cmd.current_dir(common::repo_root()).args(command).env_remove("FICUS_CONFIG");
            // Nothing reachable: a configuration error must be reported before any connection.
            cmd.env("FICUS_SOURCE_URI", "mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=500");
            cmd.env("FICUS_KAFKA_BROKERS", "127.0.0.1:1");
            if let Some(c) = config {
                cmd.args(["--config", c]);
            }
            for (k, v) in extra {
                cmd.env(k, v);
            }
            let started = Instant::now();
            let out = cmd.output().unwrap();
            let took = started.elapsed();
            let all = plain(&text(&out));
            let label = format!("{what} ({})", command.join(" "));
            if out.status.code() != Some(2) {
                problems.push(format!("{label}: exit {:?}, expected 2:\n{all}", out.status.code()));
            }
            for n in needles {
                if !all.contains(n) {
                    problems.push(format!("{label}: the message does not name {n:?}:\n{all}"));
                }
            }
            if all.contains("hunter2") {
                problems.push(format!("{label}: printed the password:\n{all}"));
            }
            if took > Duration::from_secs(20) {
                problems.push(format!("{label}: took {took:?} to refuse a broken configuration"));
            }
        }
    }
    announce(&format!(
        "fault broken-config: {} cases x (validate, run): {} problems (each must exit 2 naming file and field)",
        cases.len(),
        problems.len()
    ));
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}
