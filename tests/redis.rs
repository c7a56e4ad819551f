//! The cache service in Redis (issue 23), against real servers: secantusd-rs, Tansu and
//! Debian's redis-server, through a live `ficus run`. Nothing waits for ficus to be ready
//! before writing, and every wait polls its condition with a generous bound.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use bson::{Bson, DateTime, Document, doc, oid::ObjectId};
use common::{Redis, World, eventually, free_port, http_get, poll_until, read_all};
use redis::Commands;

const TOPIC: &str = "linechatbot.cache_entries";
const HOUR: i64 = 3_600_000;

/// A cache entry in the monolith's shape, expiring at `expires` (epoch ms).
fn entry(key: &str, kind: &str, expires: i64) -> Document {
    let value = match kind {
        "ai_response" => doc! {
            "session_id": "S-1", "user_id": "U-1", "provider": "deepSeek", "prompt": "Is vitamin C safe?",
            "response": format!("answer for {key}"), "tokens": "412", "confidence": 0.87,
        },
        _ => doc! {
            "query": format!("query {key}"), "lang": "en",
            "results": [{ "title": "Vitamin C", "url": "https://example.org/vc", "summary": "About it.", "relevance": 1 }],
        },
    };
    doc! {
        "_id": ObjectId::new(), "key": key, "kind": kind, "expires_at": DateTime::from_millis(expires),
        "created_at": DateTime::now(), "value": value,
    }
}

fn kind_of(i: u64) -> &'static str {
    if i.is_multiple_of(2) { "ai_response" } else { "research" }
}

fn redis_key(kind: &str, key: &str) -> String {
    format!("cache:{kind}:{key}")
}

/// The absolute expiry Redis holds for a key, in epoch seconds (`None`: no such key).
fn expire_secs(conn: &mut redis::Connection, key: &str) -> Option<i64> {
    let ms: i64 = redis::cmd("PEXPIRETIME").arg(key).query(conn).unwrap();
    (ms >= 0).then_some(ms / 1000)
}

fn now_ms() -> i64 {
    DateTime::now().timestamp_millis()
}

fn out(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn ok(o: &std::process::Output) -> String {
    let text = out(o);
    assert!(o.status.success(), "exit {:?}:\n{text}", o.status.code());
    text
}

/// Whether every entry of `expected` (key, kind, expiry ms) is in Redis expiring in that second,
/// and every key of `gone` is not.
fn holds(redis: &Redis, expected: &[(String, &str, i64)], gone: &[String]) -> bool {
    let mut c = redis.conn();
    expected.iter().all(|(key, kind, at)| expire_secs(&mut c, &redis_key(kind, key)) == Some(at / 1000))
        && gone.iter().all(|k| !c.exists::<_, bool>(k).unwrap())
}

fn metric(port: u16, name: &str) -> Option<f64> {
    let (_, body) = common::try_http_get(port, "/metrics").ok()?;
    body.lines()
        .find(|l| l.starts_with(name) && l.contains("service=\"cache\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Waits until the archive holds every distinct event of the cache topic.
async fn archive_caught_up(world: &World, client: &mongodb::Client) {
    let events = client.database("ficus").collection::<Document>("events");
    for _ in 0..4 {
        let ids: HashSet<String> =
            read_all(&world.kafka.brokers(), &[TOPIC]).into_iter().map(|r| r.message.id().to_string()).collect();
        let archived = || async { events.count_documents(doc! { "topic": TOPIC }).await.unwrap() == ids.len() as u64 };
        if poll_until(Duration::from_secs(60), archived).await {
            return;
        }
    }
    panic!("the archive never caught up with the cache topic");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cache_follows_the_monolith_expires_with_it_and_never_regresses() {
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    let entries = client.database("linechatbot").collection::<Document>("cache_entries");
    let base = now_ms() + HOUR;
    let mut live: Vec<(String, &str, i64)> =
        (0..20u64).map(|i| (format!("k{i}"), kind_of(i), base + i as i64 * 1_000 + 123)).collect();
    let seed: Vec<Document> = live.iter().map(|(k, kind, at)| entry(k, kind, *at)).collect();
    entries.insert_many(seed).await.unwrap();
    entries.insert_one(entry("k-old", "research", now_ms() - HOUR)).await.unwrap();

    let metrics = free_port();
    let mut f =
        world.spawn_ficus(&["run", "--service", "cache", "--metrics-addr", &format!("127.0.0.1:{metrics}")], &[]);
    // Streaming at once, without waiting for ficus: new entries, an update, deletes.
    for i in 20..30u64 {
        let (k, at) = (format!("k{i}"), base + i as i64 * 1_000);
        entries.insert_one(entry(&k, kind_of(i), at)).await.unwrap();
        live.push((k, kind_of(i), at));
    }
    let later = base + 5 * HOUR + 777;
    let update = doc! { "$set": { "value.response": "updated", "expires_at": DateTime::from_millis(later) } };
    entries.update_one(doc! { "key": "k0" }, update).await.unwrap();
    live[0].2 = later;
    entries.delete_many(doc! { "key": { "$in": ["k1", "k2"] } }).await.unwrap();
    live.retain(|(k, _, _)| k != "k1" && k != "k2");
    let gone = [redis_key("research", "k1"), redis_key("ai_response", "k2"), redis_key("research", "k-old")];

    eventually("Redis holds every live entry, expiring with the monolith's", Duration::from_secs(180), || async {
        holds(&world.redis, &live, &gone)
    })
    .await;
    let mut c = world.redis.conn();
    assert_eq!(c.hget::<_, _, String>(redis_key("ai_response", "k0"), "response").unwrap(), "updated");
    let tokens: String = c.hget(redis_key("ai_response", "k0"), "tokensUsed").unwrap();
    assert_eq!(tokens, "412", "hash fields hold the target's values");
    let research: String = c.get(redis_key("research", "k3")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&research).unwrap();
    assert_eq!(json["results"][0]["relevance"], 1.0, "{research}");

    // Documents that cannot be entries are dead-lettered, naming what is wrong: one without its
    // key field (the transform refuses it), one without an expiry (the sink refuses it).
    let mut keyless = entry("bad-1", "research", base);
    keyless.remove("key");
    let mut timeless = entry("bad-2", "research", base);
    timeless.remove("expires_at");
    entries.insert_many([keyless, timeless]).await.unwrap();
    let dlq = format!("{TOPIC}.dlq");
    let mut dead = Vec::new();
    let found = poll_until(Duration::from_secs(90), || {
        dead = common::read_json_all(&world.kafka.brokers(), &[dlq.as_str()]);
        let n = dead.len();
        async move { n >= 2 }
    })
    .await;
    assert!(found, "dead letters: {dead:#?}");
    let by_stage = |stage: &str| dead.iter().find(|d| d["stage"] == stage).unwrap_or_else(|| panic!("{dead:#?}"));
    assert_eq!(by_stage("transform")["service"], "cache");
    let why = by_stage("transform")["error"].as_str().unwrap().to_string();
    assert!(why.contains("redis.key `cache:{kind}:{key}`: `key` has no value"), "{why}");
    let why = by_stage("write")["error"].as_str().unwrap().to_string();
    assert!(why.contains("`expiresAt` (redis.expire_at) has no value"), "{why}");
    // Their deletes write nothing: a document that made no entry has none to delete.
    entries.delete_many(doc! { "value.query": { "$in": ["query bad-1", "query bad-2"] } }).await.unwrap();

    // An entry whose monolith expiry moves into the past arrives expired: its key goes, counted.
    let past = doc! { "$set": { "expires_at": DateTime::from_millis(now_ms() - 60_000) } };
    entries.update_one(doc! { "key": "k3" }, past).await.unwrap();
    live.retain(|(k, _, _)| k != "k3");
    let k3 = redis_key("research", "k3");
    eventually("an expired event deletes its key", Duration::from_secs(90), || async {
        !world.redis.conn().exists::<_, bool>(&k3).unwrap()
    })
    .await;
    eventually("expired arrivals counted", Duration::from_secs(30), || async {
        metric(metrics, "ficus_redis_expired_on_arrival_total").is_some_and(|n| n >= 2.0)
    })
    .await;

    // k0 changes once more; an older event of it, redelivered behind that change, must not
    // regress it (its value nor its expiry).
    let latest = base + 7 * HOUR + 555;
    let update = doc! { "$set": { "value.response": "final", "expires_at": DateTime::from_millis(latest) } };
    entries.update_one(doc! { "key": "k0" }, update).await.unwrap();
    live[0].2 = latest;
    let k0 = redis_key("ai_response", "k0");
    eventually("k0's last change in Redis", Duration::from_secs(90), || async {
        world.redis.conn().hget::<_, _, Option<String>>(&k0, "response").unwrap().as_deref() == Some("final")
    })
    .await;
    let response = |r: &common::Record| {
        r.event()
            .data
            .after
            .as_ref()
            .and_then(|d| d.get_document("value").ok()?.get_str("response").ok().map(str::to_string))
    };
    let old = read_all(&world.kafka.brokers(), &[TOPIC])
        .into_iter()
        .find(|r| r.is_event() && r.key == "k0" && response(r).is_some_and(|v| v != "final"))
        .expect("an older event of k0");
    let producer: rdkafka::producer::FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", world.kafka.brokers()).create().unwrap();
    let payload = old.message.encode();
    let record = rdkafka::producer::FutureRecord::to(TOPIC).key(&old.key).payload(&payload).partition(old.partition);
    producer.send(record, Duration::from_secs(10)).await.unwrap();
    // Entries written after it, some on its partition, show the consumer has passed it.
    let after: Vec<(String, &str, i64)> = (0..20).map(|i| (format!("s{i}"), "research", base + 42_000)).collect();
    for (k, kind, at) in &after {
        entries.insert_one(entry(k, kind, *at)).await.unwrap();
    }
    eventually("the entries written after the redelivery", Duration::from_secs(120), || async {
        holds(&world.redis, &after, &[])
    })
    .await;
    let behind = read_all(&world.kafka.brokers(), &[TOPIC])
        .into_iter()
        .any(|r| r.partition == old.partition && r.key.starts_with('s'));
    assert!(behind, "no later entry landed on partition {}; the check above proves nothing", old.partition);
    assert_eq!(c.hget::<_, _, String>(&k0, "response").unwrap(), "final", "the old event regressed k0");
    assert_eq!(expire_secs(&mut c, &k0), Some(latest / 1000), "the old event moved k0's expiry");
    live.extend(after);

    // verify passes; a replay rebuilds the keys, drops a stray one ficus wrote, keeps others'.
    eventually("verify passes", Duration::from_secs(60), || async {
        world.ficus(&["verify", "--service", "cache", "--settle", "1"], &[]).status.success()
    })
    .await;
    archive_caught_up(&world, &client).await;
    let stray = redis_key("research", "ghost");
    let _: () = c.set_ex(&stray, "{}", 3_600).unwrap();
    let _: () = c.set_ex(format!("ficus:cache:v:{stray}"), "000000000000000000000000000001|research", 3_600).unwrap();
    let _: () = c.set("not-ficus", "kept").unwrap();
    let text = ok(&world.ficus(&["replay", "--service", "cache"], &[]));
    assert!(text.contains("rebuilt from"), "{text}");
    assert!(!c.exists::<_, bool>(&stray).unwrap(), "a live key the rebuild did not produce must go");
    assert_eq!(c.get::<_, String>("not-ficus").unwrap(), "kept");
    assert!(holds(&world.redis, &live, &gone), "the rebuild lost or changed entries");
    let report = ok(&world.ficus(&["verify", "--service", "cache", "--settle", "1"], &[]));
    assert!(report.contains("consistency 100.00%"), "{report}");

    // Tampering behind ficus's back is found: a value, and an expiry moved by a day.
    let _: () = c.hset(redis_key("ai_response", "k4"), "response", "tampered").unwrap();
    let k5 = redis_key("research", "k5");
    let _: () = redis::cmd("PEXPIREAT").arg(&k5).arg((base + 30 * HOUR).to_string()).query(&mut c).unwrap();
    let tampered = world.ficus(&["verify", "--service", "cache", "--settle", "1", "--sample", "5"], &[]);
    let report = out(&tampered);
    assert_eq!(tampered.status.code(), Some(1), "{report}");
    assert!(report.contains("cache:ai_response:k4") && report.contains("tampered"), "{report}");
    assert!(report.contains("cache:research:k5"), "{report}");

    // Forward only: the cache service never writes back, so it cannot take over writes.
    let cutover = world.ficus(&["cutover", "--service", "cache", "--to", "10"], &[]);
    assert_eq!(cutover.status.code(), Some(2), "{}", out(&cutover));
    assert!(out(&cutover).contains("forward only"), "{}", out(&cutover));
    assert!(f.terminate().success(), "{}", f.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_restart_mid_stream_loses_nothing() {
    let mut world = World::start();
    // Appended to disk on every write, so what Redis acknowledged outlives its SIGKILL; the
    // writes ficus had in flight, or failed to make while it was down, must arrive all the same.
    world.redis.kill();
    let dir = world.dir.path().join("redis-durable");
    world.redis = Redis::start(&dir, &["--appendonly", "yes", "--appendfsync", "always"]);
    world.apply_topics();
    let client = world.mongo.client().await;
    let entries = client.database("linechatbot").collection::<Document>("cache_entries");
    let mut f = world.spawn_ficus(&["run", "--roles", "tail,consume", "--service", "cache"], &[]);
    let base = now_ms() + HOUR;
    let expected: Vec<(String, &str, i64)> =
        (0..300u64).map(|i| (format!("r{i}"), kind_of(i), base + i as i64 * 1_000)).collect();
    let writer = {
        let (entries, expected) = (entries.clone(), expected.clone());
        tokio::spawn(async move {
            for (k, kind, at) in &expected {
                entries.insert_one(entry(k, kind, *at)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };
    // Kill it once some entries have landed, keep it down a while, start it on the same port.
    eventually("some entries in Redis", Duration::from_secs(120), || async {
        world.redis.conn().exists::<_, bool>(redis_key("ai_response", "r0")).unwrap()
    })
    .await;
    world.redis.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    world.redis.restart();
    writer.await.unwrap();
    eventually("every entry in Redis after the restart", Duration::from_secs(180), || async {
        holds(&world.redis, &expected, &[])
    })
    .await;
    eventually("verify passes", Duration::from_secs(60), || async {
        world.ficus(&["verify", "--service", "cache", "--settle", "1"], &[]).status.success()
    })
    .await;
    assert!(f.terminate().success(), "{}", f.logs());

    // An entry deleted while ficus is stopped, its history then discarded (--resnapshot): no
    // delete event ever comes, and the completed snapshot's sweep removes it.
    entries.delete_one(doc! { "key": "r5" }).await.unwrap();
    let mut again = world.spawn_ficus(&["run", "--roles", "tail,consume", "--service", "cache", "--resnapshot"], &[]);
    let (kept, swept) = (&expected[..5], [redis_key("research", "r5")]);
    eventually("the snapshot swept the entry the monolith no longer has", Duration::from_secs(180), || async {
        holds(&world.redis, kept, &swept)
    })
    .await;
    assert!(again.terminate().success(), "{}", again.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_evicting_redis_is_refused_and_a_nearly_full_one_pauses_the_consumer() {
    let world = World::start();
    world.apply_topics();
    let mut c = world.redis.conn();
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("allkeys-lru").query(&mut c).unwrap();
    let mut refused = world.spawn_ficus(&["run", "--roles", "consume", "--service", "cache"], &[]);
    let status = refused.wait(Duration::from_secs(90)).expect("ficus run still running with an evicting Redis");
    assert_eq!(status.code(), Some(2), "{}", refused.logs());
    let logs = refused.logs();
    assert!(logs.contains("maxmemory-policy `allkeys-lru`") && logs.contains("noeviction"), "{logs}");

    // noeviction, but above the pause share: nothing is written until there is room again.
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("noeviction").query(&mut c).unwrap();
    let info: String = redis::cmd("INFO").arg("memory").query(&mut c).unwrap();
    let used: u64 = info.lines().find_map(|l| l.strip_prefix("used_memory:")).unwrap().trim().parse().unwrap();
    let tight = (used as f64 / 0.95) as u64;
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(tight).query(&mut c).unwrap();
    let metrics = free_port();
    let args =
        ["run", "--roles", "tail,consume", "--service", "cache", "--metrics-addr", &format!("127.0.0.1:{metrics}")];
    let mut f = world.spawn_ficus(&args, &[]);
    let client = world.mongo.client().await;
    let entries = client.database("linechatbot").collection::<Document>("cache_entries");
    let at = now_ms() + HOUR;
    entries.insert_one(entry("p0", "research", at)).await.unwrap();
    eventually("the consumer says it is paused", Duration::from_secs(120), || async {
        metric(metrics, "ficus_redis_paused") == Some(1.0)
    })
    .await;
    assert!(!c.exists::<_, bool>(redis_key("research", "p0")).unwrap(), "written while paused");
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(0).query(&mut c).unwrap();
    eventually("written once there is room", Duration::from_secs(60), || async {
        holds(&world.redis, &[("p0".to_string(), "research", at)], &[])
            && metric(metrics, "ficus_redis_paused") == Some(0.0)
    })
    .await;
    let (code, _) = http_get(metrics, "/healthz");
    assert_eq!(code, 200);
    assert!(f.terminate().success(), "{}", f.logs());
    let _ = Bson::Null;
}
