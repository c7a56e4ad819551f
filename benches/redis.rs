//! The Redis sink's figure (issue 23): cache entries per second through `RedisSink::apply`
//! (plan, one pipeline of guarded EVALSHA calls) beside a bare ceiling measured in the same run
//! against the same server: a pipelined loop of the same writes without the guard (SET or
//! HSET, PEXPIREAT, and the record's SET PXAT per entry).
//!
//! `cargo bench --bench redis` (needs Debian's redis-server: `.ci/install-servers` installs it;
//! `FICUS_REDIS_SERVER` names another). `FICUS_BENCH_REDIS_ENTRIES` (default 50,000) sets how
//! many entries each side writes, in batches of the consumer's default 500. Under `cargo test`
//! it prints that it is skipped.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::{Bson, DateTime, doc};
use ficus::event::Version;
use ficus::sink::redis::plan::Layout;
use ficus::sink::{RedisSink, Sink, Versioned};
use ficus::transform::{ServiceTransforms, WriteOp};

const BATCH: usize = 500;

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("redis bench: skipped (run it with `cargo bench --bench redis`)");
        return;
    }
    let entries: usize = std::env::var("FICUS_BENCH_REDIS_ENTRIES").ok().and_then(|v| v.parse().ok()).unwrap_or(50_000);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server = std::env::var("FICUS_REDIS_SERVER").unwrap_or_else(|_| "/usr/bin/redis-server".into());
    let mut redis = Server(
        Command::new(server)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server"),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (ficus, bare) = rt.block_on(run(port, entries));
    redis.stop();
    println!();
    println!("| figure | ficus | bare ceiling | ratio |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| Redis sink, {entries} cache entries (json, guarded) | {ficus:.0} entries/s | {bare:.0} | {:.2}× |",
        ficus / bare
    );
}

struct Server(Child);

impl Server {
    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn run(port: u16, entries: usize) -> (f64, f64) {
    let uri = format!("redis://127.0.0.1:{port}");
    let client = redis::Client::open(uri.as_str()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let conn = loop {
        match client.get_connection_manager().await {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => panic!("redis at {uri}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let topics = ficus::config::topics::load(&root.join("topics")).unwrap();
    let cache: Arc<ServiceTransforms> =
        Arc::new(ficus::transform::load_service(&root.join("transforms/cache"), &topics).unwrap());
    let expires = DateTime::from_millis(DateTime::now().timestamp_millis() + 3_600_000);
    let batches: Vec<Vec<Versioned>> = (0..entries)
        .collect::<Vec<_>>()
        .chunks(BATCH)
        .map(|chunk| chunk.iter().map(|&i| versioned(i, expires)).collect())
        .collect();

    let sink =
        RedisSink::open(conn.clone(), uri.clone(), cache, Layout::live("cache"), Duration::from_secs(86_400), 0.99)
            .await
            .unwrap();
    let started = Instant::now();
    for b in &batches {
        sink.apply(b, None).await.unwrap();
    }
    let ficus = entries as f64 / started.elapsed().as_secs_f64();

    let mut c = conn.clone();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();
    let started = Instant::now();
    for b in &batches {
        let mut pipe = redis::pipe();
        for v in b {
            let WriteOp::Upsert { id, doc, .. } = &v.ops[0] else { unreachable!() };
            let key = id.as_str().unwrap();
            let at = expires.timestamp_millis();
            pipe.cmd("SET").arg(key).arg(ficus::sink::redis::plan::json(doc)).ignore();
            pipe.cmd("PEXPIREAT").arg(key).arg(at).ignore();
            pipe.cmd("SET").arg(format!("ficus:cache:v:{key}")).arg(v.version.as_str()).arg("PXAT").arg(at).ignore();
        }
        let () = pipe.query_async(&mut c).await.unwrap();
    }
    let bare = entries as f64 / started.elapsed().as_secs_f64();
    (ficus, bare)
}

/// The writes of one research entry, as the cache transforms make them.
fn versioned(i: usize, expires: DateTime) -> Versioned {
    let key = format!("cache:research:bench-{i}");
    let doc = doc! {
        "kind": "research", "key": format!("bench-{i}"), "query": "vitamin c dosage", "language": "en",
        "expiresAt": expires,
        "results": [{ "title": "Vitamin C", "url": "https://example.org/vc", "summary": "About vitamin C.", "relevance": 0.93 }],
    };
    Versioned {
        version: Version::at(bson::Timestamp { time: 1_800_000_000, increment: i as u32 }, 0),
        event_id: format!("e{i}"),
        source_collection: "cache_entries".into(),
        source_id: Bson::Int64(i as i64),
        event_time: DateTime::now(),
        ops: vec![WriteOp::Upsert { collection: "research".into(), id: Bson::String(key), doc }],
        redriven: false,
    }
}
