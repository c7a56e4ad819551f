//! Micro benchmarks of ficus's pure pipeline stages, per reference document size.
//!
//! Tail side, per change: change record → canonical events (`mapping::map_change` with the shipped
//! `topics/`) → encoded bytes (`CanonicalEvent::encode`). Consume side, per event: bytes →
//! `Message::decode` → `ServiceTransforms::apply_message` (the shipped `transforms/`) → write model
//! (`sink::Versioned::of` plus each upsert's document as the sink sends it: `_id` and `_ficus`
//! metadata added, encoded to BSON as the driver does). `tail_path` and `consume_path` time the
//! stages back to back.
//!
//! Cases: a webhook log (~300 B, read by metrics_db and conversations_db), a customer with three
//! purchases (~2 KB, customers_db; four events), a conversation of 400 messages inserted (~64 KB,
//! conversations_db; 401 events: one `conversation.message_added` per message) and the same
//! conversation growing by one message (`$push`, with its pre-image; two events).
//!
//! `cargo bench --bench pipeline` (criterion; its reports land in `target/criterion`), then the
//! figures go to `target/bench/pipeline.json` and the merged `target/bench/ficus-bench.json`.
//! Under `cargo test --all-targets` criterion runs each benchmark once, as a smoke test.

#[path = "support/mod.rs"]
mod support;

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bson::{Bson, DateTime, Document, Timestamp, doc};
use criterion::{BatchSize, Criterion, Throughput};
use ficus::config::topics::Topics;
use ficus::event::mapping::{ChangeRecord, map_change};
use ficus::event::{CanonicalEvent, Message, Op};
use ficus::sink::{META, Versioned};
use ficus::testkit::workload::Workload;
use ficus::transform::{ServiceTransforms, WriteOp};
use serde_json::{Value, json};

/// A resume token of the length MongoDB produces for a change (`_data`, hex).
const TOKEN: &str = "8267A1B2C3000000012B042C0100296E5A1004B1F6E2A0C4D94B21A7D8E6F3C2B1A09E463C6F7065726174696F6E54797065003C696E736572740046646F63756D656E744B657900463C5F6964003C65A1B2C3D4E5F60718293A4B000004";

struct Case {
    name: &'static str,
    record: ChangeRecord,
    services: Vec<&'static str>,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn record(
    op: Op,
    collection: &str,
    after: Document,
    before: Option<Document>,
    changed: Option<Document>,
) -> ChangeRecord {
    ChangeRecord {
        op,
        collection: collection.into(),
        document_id: after.get("_id").cloned().unwrap_or(Bson::Null),
        after: Some(after),
        before,
        changed,
        removed: Vec::new(),
        truncated: Vec::new(),
        cluster_time: Timestamp { time: 1_767_225_600, increment: 7 },
        index: 1,
        wall_time: Some(DateTime::from_millis(1_767_225_600_123)),
        resume_token: Some(TOKEN.into()),
        txn: None,
        origin: None,
    }
}

fn cases() -> Vec<Case> {
    let mut w = Workload::new(6);
    let log = w.log(0); // webhook
    // The first customer with exactly three purchases (deterministic for the seed).
    let customer = (0..)
        .map(|i| w.customer(i))
        .find(|c| c.get_array("purchases").map(|a| a.len() == 3).unwrap_or(false))
        .expect("some customer has three purchases");
    let conversation = w.conversation(1, 400);
    let mut grown = conversation.clone();
    let message = w.message(400);
    grown.get_array_mut("messages").expect("messages").push(Bson::Document(message.clone()));
    let now = DateTime::from_millis(1_767_225_600_123);
    grown.insert("last_activity", now);
    grown.insert("updated_at", now);
    let changed = doc! { "messages.400": message, "last_activity": now, "updated_at": now };
    vec![
        Case {
            name: "log_300B",
            record: record(Op::Insert, "logs", log, None, None),
            services: vec!["metrics_db", "conversations_db"],
        },
        Case {
            name: "customer_2KB",
            record: record(Op::Insert, "customers", customer, None, None),
            services: vec!["customers_db"],
        },
        Case {
            name: "conversation_64KB_insert",
            record: record(Op::Insert, "conversations", conversation.clone(), None, None),
            services: vec!["conversations_db"],
        },
        Case {
            name: "conversation_64KB_push",
            record: record(Op::Update, "conversations", grown, Some(conversation), Some(changed)),
            services: vec!["conversations_db"],
        },
    ]
}

fn bson_len(d: &Document) -> u64 {
    bson::serialize_to_vec(d).map(|v| v.len() as u64).unwrap_or(0)
}

/// Bytes of source documents a change carries (after, before, changed).
fn source_bytes(r: &ChangeRecord) -> u64 {
    [&r.after, &r.before, &r.changed].into_iter().flatten().map(bson_len).sum()
}

/// What the sink hands the driver for one event's writes: the versioned batch item and, per
/// upsert, the replacement document with `_id` and `_ficus` metadata, BSON-encoded.
fn write_model(ev: &Message, ops: Vec<WriteOp>) -> (Versioned, usize) {
    let v = Versioned::of(ev, ops);
    let mut bytes = 0;
    for op in &v.ops {
        if let WriteOp::Upsert { id, doc, .. } = op {
            let mut d = doc.clone();
            d.insert("_id", id.clone());
            d.insert(
                META,
                doc! { "v": &v.version, "src": { "c": &v.source_collection, "id": v.source_id.clone() }, "event": &v.event_id },
            );
            bytes += bson::serialize_to_vec(&d).map(|b| b.len()).unwrap_or(0);
        }
    }
    (v, bytes)
}

struct Row {
    case: &'static str,
    stage: &'static str,
    events: u64,
    bytes: u64,
}

fn main() {
    let topics: Topics = ficus::config::topics::load(&repo().join("topics")).unwrap_or_else(|r| panic!("{r}"));
    let services: Vec<ServiceTransforms> =
        ficus::transform::load_all(&repo().join("transforms"), &topics).unwrap_or_else(|r| panic!("{r}"));
    let service = |name: &str| services.iter().find(|s| s.service() == name).expect("shipped service");
    let criterion_dir = support::out_dir().parent().map(Path::to_path_buf).unwrap_or_default().join("criterion");
    let mut c = Criterion::default()
        .output_directory(&criterion_dir)
        .warm_up_time(Duration::from_millis(700))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .configure_from_args();

    let mut rows: Vec<Row> = Vec::new();
    for case in cases() {
        let def = topics.for_collection(&case.record.collection).expect("shipped topic");
        let svcs: Vec<&ServiceTransforms> = case.services.iter().map(|s| service(s)).collect();
        let events = map_change(def, "linechatbot", case.record.clone()).events;
        let encoded: Vec<Vec<u8>> = events.iter().map(CanonicalEvent::encode).collect();
        let decoded: Vec<Message> = encoded.iter().map(|b| Message::decode(b).unwrap()).collect();
        let ops: Vec<Vec<WriteOp>> =
            decoded.iter().map(|ev| svcs.iter().flat_map(|s| s.apply_message(ev).unwrap()).collect()).collect();
        let n = events.len() as u64;
        let src = source_bytes(&case.record);
        let wire: u64 = encoded.iter().map(|b| b.len() as u64).sum();
        let writes: u64 = ops.iter().map(|o| o.len() as u64).sum();

        let mut g = c.benchmark_group(case.name);
        if src > 10_000 {
            g.sample_size(10);
        }
        let mut bench = |stage: &'static str, elements: u64, bytes: u64, f: &mut dyn FnMut(&mut criterion::Bencher)| {
            g.throughput(Throughput::ElementsAndBytes { elements, bytes });
            g.bench_function(stage, f);
            rows.push(Row { case: case.name, stage, events: elements, bytes });
        };
        bench("map", n, src, &mut |b| {
            b.iter_batched(
                || case.record.clone(),
                |r| black_box(map_change(def, "linechatbot", r)),
                BatchSize::SmallInput,
            )
        });
        bench("encode", n, wire, &mut |b| {
            b.iter(|| {
                for ev in &events {
                    black_box(ev.encode());
                }
            })
        });
        bench("tail_path", n, src, &mut |b| {
            b.iter_batched(
                || case.record.clone(),
                |r| {
                    for ev in map_change(def, "linechatbot", r).events {
                        black_box(ev.encode());
                    }
                },
                BatchSize::SmallInput,
            )
        });
        bench("decode", n, wire, &mut |b| {
            b.iter(|| {
                for bytes in &encoded {
                    black_box(Message::decode(bytes).unwrap());
                }
            })
        });
        bench("transform", n, wire, &mut |b| {
            b.iter(|| {
                for ev in &decoded {
                    for s in &svcs {
                        black_box(s.apply_message(ev).unwrap());
                    }
                }
            })
        });
        bench("write_model", n, wire, &mut |b| {
            b.iter_batched(
                || ops.clone(),
                |ops| {
                    for (ev, o) in decoded.iter().zip(ops) {
                        black_box(write_model(ev, o));
                    }
                },
                BatchSize::SmallInput,
            )
        });
        bench("consume_path", n, wire, &mut |b| {
            b.iter(|| {
                for bytes in &encoded {
                    let ev = Message::decode(bytes).unwrap();
                    let o: Vec<WriteOp> = svcs.iter().flat_map(|s| s.apply_message(&ev).unwrap()).collect();
                    black_box(write_model(&ev, o));
                }
            })
        });
        if case.name == "customer_2KB" {
            // Where encode and decode spend their time, to aim fixes in src/event.rs.
            let afters: Vec<Document> = events.iter().filter_map(|e| e.data.after.clone()).collect();
            let values: Vec<Value> = events.iter().map(CanonicalEvent::to_json).collect();
            bench("encode:clone_after", n, wire, &mut |b| {
                b.iter(|| {
                    for d in &afters {
                        black_box(d.clone());
                    }
                })
            });
            bench("encode:to_json", n, wire, &mut |b| {
                b.iter(|| {
                    for ev in &events {
                        black_box(ev.to_json());
                    }
                })
            });
            bench("encode:serialize_value", n, wire, &mut |b| {
                b.iter(|| {
                    for v in &values {
                        black_box(serde_json::to_vec(v).unwrap());
                    }
                })
            });
            bench("decode:parse_value", n, wire, &mut |b| {
                b.iter(|| {
                    for bytes in &encoded {
                        black_box(serde_json::from_slice::<Value>(bytes).unwrap());
                    }
                })
            });
            bench("decode:from_json", n, wire, &mut |b| {
                b.iter_batched(
                    || values.clone(),
                    |vs| {
                        for v in vs {
                            black_box(CanonicalEvent::from_json(v).unwrap());
                        }
                    },
                    BatchSize::SmallInput,
                )
            });
        }
        g.finish();
        eprintln!(
            "{}: {} source bytes, {n} event(s), {wire} bytes on the wire, {writes} write(s) for {:?}",
            case.name, src, case.services
        );
    }
    c.final_summary();

    if !support::bench_mode() {
        return; // `cargo test --all-targets`: each benchmark ran once as a smoke test
    }
    let mut out = Vec::new();
    for r in &rows {
        // criterion turns `:` in a benchmark id into `_` in its directory names.
        let est = criterion_dir.join(r.case).join(r.stage.replace(':', "_")).join("new").join("estimates.json");
        let Some(ns) = std::fs::read(&est)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["mean"]["point_estimate"].as_f64())
        else {
            continue; // filtered out on the command line
        };
        let secs = ns / 1e9;
        out.push(json!({
            "case": r.case, "stage": r.stage, "events": r.events, "bytes": r.bytes,
            "ns_per_iter": ns, "ns_per_event": ns / r.events as f64,
            "events_per_sec": r.events as f64 / secs, "mb_per_sec": r.bytes as f64 / secs / 1e6,
        }));
    }
    let notes = vec![
        "bytes: source document bytes (BSON) for map and tail_path, canonical JSON bytes on the wire for the others"
            .to_string(),
        "events: canonical events per change; a 400-message conversation insert maps to 401 events, each carrying the whole 64 KB document".to_string(),
    ];
    support::publish("pipeline", json!({ "machine": support::machine(), "rows": out, "notes": notes }));
}
